"""Audio decoding, resampling and the log-mel front-end.

Decoding uses soundfile (libsndfile: WAV, FLAC, OGG/Vorbis/Opus, MP3), resampling uses soxr, and the
mel front-end is plain torch so that it runs wherever torch runs (CPU, CUDA, autocast) without
torchaudio.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile
import soxr
import torch
from torch import nn

__all__ = ["AudioError", "load_audio", "resample", "hz_to_mel", "mel_to_hz", "mel_filterbank", "LogMel"]


class AudioError(RuntimeError):
    """A file could not be decoded into usable audio; the message names the file and the reason."""


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample a mono float signal with soxr (high quality); a no-op when the rates agree."""
    if orig_sr == target_sr:
        return np.asarray(audio, dtype=np.float32)
    return soxr.resample(np.asarray(audio, dtype=np.float32), orig_sr, target_sr, quality="HQ").astype(
        np.float32, copy=False
    )


# Below this a file's sample rate is a damaged header, not audio (telephone audio is 8 kHz).
MIN_SAMPLE_RATE = 1000


def _libsndfile_detail(error: Exception, path: Path) -> str:
    """libsndfile's reason, without the path it repeats, or nothing where it misleads.

    For an MP3 it cannot decode, libsndfile says "File does not exist or is not a regular file", of a
    file that exists (checked before decoding); that reason is dropped.
    """
    detail = str(error).strip()
    for prefix in (f"Error opening {str(path)!r}:", "Error opening"):
        if detail.startswith(prefix):
            detail = detail[len(prefix):].strip()
            break
    if not detail or "does not exist" in detail:
        return ""
    return f" (libsndfile: {detail})"


# Audio formats libsndfile does not decode, which music collections often hold (AAC in .m4a from iTunes, WMA, ...):
# named as such where a file of one fails to decode, and by a folder read without tags, which leaves them out.
UNSUPPORTED_AUDIO_EXTENSIONS = (".m4a", ".m4b", ".mp4", ".aac", ".alac", ".wma", ".ape", ".wv", ".mka", ".webm",
                                ".ac3", ".amr", ".dsf", ".dff", ".mpc")
CONVERT_HINT = "convert to FLAC or WAV, e.g. ffmpeg -i IN.m4a OUT.flac"


# What load_audio says of a file it may not open (permissions, an I/O error): not the file's fault, so a mel
# cache tries it again at its next build.
UNREADABLE = "cannot open the file"


def load_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """Decode ``path`` to a float32 mono signal at ``sample_rate``.

    Channels are averaged. Raises :class:`AudioError` naming the file when it is missing, unreadable,
    empty or not audio, so callers can skip it and report why.
    """
    if int(sample_rate) != sample_rate or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    path = Path(path)
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, not an audio file")
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    try:  # libsndfile says "System error." of a file it may not open: say what it is
        with open(path, "rb"):
            pass
    except OSError as error:
        fix = "; make it readable (chmod a+r)" if isinstance(error, PermissionError) else ""
        raise AudioError(f"{path}: {UNREADABLE}: {error.strerror or error}{fix}") from None
    try:
        data, orig_sr = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as error:  # libsndfile raises several types; all mean "not decodable"
        # (A FLAC or WAV so named decodes: libsndfile reads the content, not the name.)
        if path.suffix.lower() in UNSUPPORTED_AUDIO_EXTENSIONS:
            raise AudioError(f"{path}: cannot decode audio: a {path.suffix.lower()} file, a format not read here (WAV, "
                             f"FLAC, OGG/Vorbis/Opus, MP3, AIFF); {CONVERT_HINT}") from None
        raise AudioError(
            f"{path}: cannot decode audio: not a readable WAV/FLAC/OGG/MP3 file, or corrupt{_libsndfile_detail(error, path)}"
        ) from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: decoded to zero samples")
    if orig_sr < MIN_SAMPLE_RATE:  # resampling 1 Hz to 16 kHz asks for 16,000 times the samples: a crash
        raise AudioError(f"{path}: its header gives a sample rate of {orig_sr} Hz, below any audio's "
                         f"({MIN_SAMPLE_RATE} Hz): a damaged header, or not audio")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(mono).all():
        raise AudioError(f"{path}: decoded samples contain NaN or inf")
    return resample(mono, int(orig_sr), sample_rate)


def hz_to_mel(frequency: np.ndarray | float) -> np.ndarray:
    """Slaney's mel scale (as in librosa with ``htk=False``): linear below 1 kHz, log above."""
    frequency = np.asarray(frequency, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    log_step = math.log(6.4) / 27.0
    linear = frequency / f_sp
    logarithmic = min_log_mel + np.log(np.maximum(frequency, 1e-10) / min_log_hz) / log_step
    return np.where(frequency >= min_log_hz, logarithmic, linear)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    mel = np.asarray(mel, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    log_step = math.log(6.4) / 27.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(log_step * (mel - min_log_mel)), f_sp * mel)


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None, norm: str | None = "slaney"
) -> np.ndarray:
    """Triangular Slaney-scale mel filters, shape ``(n_mels, n_fft // 2 + 1)``.

    ``norm="slaney"`` scales each filter to unit area (librosa's default); ``None`` leaves peaks at 1.
    ``f_max`` defaults to Nyquist. A larger ``f_max`` is allowed because the study used 11025 Hz at
    16 kHz (as librosa and torchaudio allow): the filters above Nyquist then come out all zero.
    """
    f_max = sample_rate / 2.0 if f_max is None else float(f_max)
    if not 0.0 <= f_min < f_max:
        raise ValueError(f"need 0 <= f_min < f_max, got f_min={f_min}, f_max={f_max}")
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    mel_points = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    widths = np.diff(mel_points)
    ramps = mel_points[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    if norm == "slaney":
        weights *= (2.0 / (mel_points[2:] - mel_points[:-2]))[:, None]
    elif norm is not None:
        raise ValueError(f"norm must be 'slaney' or None, got {norm!r}")
    return weights


class LogMel(nn.Module):
    """Waveform ``(..., T)`` -> log-mel spectrogram in dB ``(..., n_mels, frames)``.

    The study's front-end: centred Hann STFT normalised by the window's energy, power 2, Slaney mel
    filters, ``10 log10`` with a floor of ``top_db`` below a maximum. The study used ``f_max=11025``
    at 16 kHz, which leaves 11 of 128 filters empty; the default here is Nyquist. ``norm="slaney"``
    (the default) scales each filter to unit area; the study's torchaudio ``MelSpectrogram`` left its
    ``norm`` at ``None`` (peaks at 1), which reads 13.7 dB (lowest band) to 22.7 dB (highest) louder
    at 16 kHz with 128 mels: ``norm=None`` reproduces it.

    The ``top_db`` floor is taken per waveform row, i.e. per channel: every ``(n_mels, frames)``
    output is floored ``top_db`` below its own maximum, whatever the leading dimensions. That is not
    what torchaudio's ``AmplitudeToDB`` does: it treats dimension -3 as channels and floors each
    example ``top_db`` below the maximum over all of its channels (for a ``(B, C, n_mels, frames)``
    input one floor per example; for a 3-D ``(B, n_mels, frames)`` input one floor for the whole
    batch). The two agree on a single mono waveform, which is how this project calls it (the mel
    cache passes one peak-normalised mono track at a time), and differ when channels of different
    loudness are transformed together.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 1024,
        hop_length: int = 512,
        n_mels: int = 128,
        f_min: float = 0.0,
        f_max: float | None = None,
        top_db: float | None = 100.0,
        norm: str | None = "slaney",
    ) -> None:
        super().__init__()
        self.sample_rate = sample_rate
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.n_mels = n_mels
        self.top_db = top_db
        filters = mel_filterbank(sample_rate, n_fft, n_mels, f_min, f_max, norm)
        self.register_buffer("filters", torch.from_numpy(filters).float(), persistent=False)
        window = torch.hann_window(n_fft, periodic=True)
        self.register_buffer("window", window, persistent=False)
        self.window_energy = float(window.pow(2).sum())

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for ``num_samples`` input samples (centred STFT)."""
        return num_samples // self.hop_length + 1

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.dim() == 0 or waveform.shape[-1] <= self.n_fft // 2:
            # Centred framing reflect-pads n_fft // 2 samples on each side, which needs more input.
            raise ValueError(
                f"LogMel needs waveforms of shape (..., T) with T > n_fft // 2 = {self.n_fft // 2} samples, "
                f"got shape {tuple(waveform.shape)}; pad or lengthen the input"
            )
        batch_shape = waveform.shape[:-1]
        flat = waveform.reshape(-1, waveform.shape[-1])
        # The STFT and the log are done in float32 whatever the autocast dtype: half-precision power
        # spectra overflow and lose the quiet bins that the dB scale is meant to show. The buffers are
        # cast too, so a module moved to bfloat16/float16 (e.g. "bf16-true" precision) still works.
        with torch.autocast(device_type=flat.device.type, enabled=False):
            flat = flat.float()
            window = self.window.float()
            if self.window.dtype in (torch.float16, torch.bfloat16):
                # A half-precision Hann window raises the side lobes by tenths of a dB: rebuild it.
                window = torch.hann_window(self.n_fft, periodic=True, device=flat.device)
            spectrum = torch.stft(
                flat,
                self.n_fft,
                hop_length=self.hop_length,
                window=window,
                center=True,
                pad_mode="reflect",
                return_complex=True,
            )
            power = spectrum.real.square() + spectrum.imag.square()
            power = power / self.window_energy
            mel = torch.matmul(self.filters.float(), power)
            decibels = 10.0 * torch.log10(mel.clamp_min(1e-10))
            if self.top_db is not None:
                # One floor per row of `flat` (per channel), not per example across channels as
                # torchaudio's AmplitudeToDB: see the class docstring.
                peak = decibels.amax(dim=(-2, -1), keepdim=True)
                decibels = torch.maximum(decibels, peak - self.top_db)
        return decibels.reshape(*batch_shape, self.n_mels, decibels.shape[-1])
