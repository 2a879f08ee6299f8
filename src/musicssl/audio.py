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
        return _decode(path, int(sample_rate))
    except _Undecodable as undecodable:
        error = undecodable.__cause__
        # (A FLAC or WAV so named decodes: libsndfile reads the content, not the name.)
        if path.suffix.lower() in UNSUPPORTED_AUDIO_EXTENSIONS:
            raise AudioError(f"{path}: cannot decode audio: a {path.suffix.lower()} file, a format not read here (WAV, "
                             f"FLAC, OGG/Vorbis/Opus, MP3, AIFF); {CONVERT_HINT}") from None
        raise AudioError(
            f"{path}: cannot decode audio: not a readable WAV/FLAC/OGG/MP3 file, or corrupt{_libsndfile_detail(error, path)}"
        ) from None


class _Undecodable(Exception):
    """libsndfile could not open or read the file (its error is the ``__cause__``)."""


# Frames decoded at a time: about 6 s of 44.1 kHz audio, 2 MB of float32 stereo.
DECODE_BLOCK_FRAMES = 1 << 18

# Blocks are read from libsndfile directly: SoundFile.read seeks to where it stopped after each read, and on an
# MP3 that seek resynchronises the decoder, which then gives other samples (a click where a block ends). Where
# this soundfile lacks what that takes, a file is read in one piece, as before.
_READS_BLOCKS = all(hasattr(soundfile, name) for name in ("_snd", "_ffi", "_error_check"))


def _read_block(file: soundfile.SoundFile, block: np.ndarray) -> np.ndarray:
    """The next frames of ``file`` into ``block`` (C-ordered float32, frames x channels), as many as it holds
    or as are left: ``block[:read]``. Decodes on from where the last read stopped, with no seek between."""
    if not _READS_BLOCKS:
        return file.read(len(block), dtype="float32", always_2d=True, out=block)
    read = soundfile._snd.sf_readf_float(file._file, soundfile._ffi.cast("float *", block.ctypes.data), len(block))
    soundfile._error_check(file._errorcode)
    return block[:read]


def _decode(path: Path, sample_rate: int) -> np.ndarray:
    """:func:`load_audio`'s decoding, a block at a time: the file's own samples are never held whole.

    Each block is down-mixed and fed to a soxr resampling stream, whose output is the one-shot
    :func:`resample`'s to the bit, into one array of the output's length. So beside the result (3.8 MB per
    minute at 16 kHz) a block is held (2 MB of 44.1 kHz stereo), not the whole file's samples (21 MB per
    minute) and their down-mix (11 MB). At most the file's listed frames are read (as ``soundfile.read``
    does), and fewer where it ends early.
    """
    try:
        file = soundfile.SoundFile(str(path))
    except Exception as error:  # libsndfile raises several types; all mean "not decodable"
        raise _Undecodable from error
    with file:
        orig_sr, channels = int(file.samplerate), int(file.channels)
        remaining = file.frames if file.seekable() else -1  # (read() reads at most the listed frames too)
        block_frames = DECODE_BLOCK_FRAMES if _READS_BLOCKS or remaining < 0 else max(remaining, 1)
        block = np.empty((min(block_frames, remaining) if remaining >= 0 else block_frames, channels), dtype=np.float32)
        stream = None
        output = np.empty(0, dtype=np.float32)
        filled, first = 0, True
        while True:
            wanted = len(block) if remaining < 0 else min(len(block), remaining)
            try:
                if first and file.seekable():
                    file.seek(0)  # as soundfile.read does first: an MP3 decodes otherwise without it
                data = _read_block(file, block[:wanted])
            except Exception as error:  # noqa: BLE001 - as above
                raise _Undecodable from error
            if first:
                first = False
                if data.shape[0] == 0:
                    raise AudioError(f"{path}: decoded to zero samples")
                if orig_sr < MIN_SAMPLE_RATE:  # resampling 1 Hz to 16 kHz asks for 16,000 times the samples: a crash
                    raise AudioError(f"{path}: its header gives a sample rate of {orig_sr} Hz, below any audio's "
                                     f"({MIN_SAMPLE_RATE} Hz): a damaged header, or not audio")
                if orig_sr != sample_rate:
                    stream = soxr.ResampleStream(orig_sr, sample_rate, 1, dtype="float32", quality="HQ")
                listed = file.frames if file.seekable() else data.shape[0]
                try:
                    output = np.empty(_resampled_length(listed, orig_sr, sample_rate), dtype=np.float32)
                except (MemoryError, ValueError):  # a damaged header that lists more frames than memory holds:
                    output = np.empty(1 << 20, dtype=np.float32)  # grown as the samples come, if they do
            mono = data.mean(axis=1) if channels > 1 else data[:, 0]
            if not np.isfinite(mono).all():
                raise AudioError(f"{path}: decoded samples contain NaN or inf")
            last = data.shape[0] < wanted or data.shape[0] == remaining
            if stream is not None:
                mono = stream.resample_chunk(mono, last=last)
            output, filled = _append(output, filled, mono)
            if remaining > 0:
                remaining -= data.shape[0]
            if data.shape[0] < wanted or remaining == 0:
                break
    # (A file that ends well before its listed length leaves the array longer than its samples: give the rest back.)
    return output[:filled] if len(output) - filled <= len(output) // 64 else output[:filled].copy()


def _resampled_length(frames: int, orig_sr: int, target_sr: int) -> int:
    """Room for the samples soxr gives for ``frames`` at ``orig_sr`` resampled to ``target_sr`` (it gives
    ``frames * target_sr / orig_sr`` rounded; 16 more spare a copy of the whole where it rounds up)."""
    return frames if orig_sr == target_sr else int(math.ceil(frames * target_sr / orig_sr)) + 16


def _append(output: np.ndarray, filled: int, samples: np.ndarray) -> tuple[np.ndarray, int]:
    """Copy ``samples`` into ``output`` after its first ``filled`` values, growing it where they do not fit."""
    end = filled + samples.shape[0]
    if end > len(output):
        grown = np.empty(max(end, len(output) + len(output) // 2), dtype=np.float32)
        grown[:filled] = output[:filled]
        output = grown
    output[filled:end] = samples
    return output, end


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

    def track(self, waveform: np.ndarray, peak: float | None = None, chunk_frames: int = 2048) -> np.ndarray:
        """The log-mel of one mono ``waveform`` (divided by ``peak`` where given), ``(n_mels, frames)``
        float32, computed on the CPU at most ``chunk_frames`` frames at a time, in chunks of even length.

        The numbers are :meth:`forward`'s on ``torch.from_numpy(waveform / np.float32(peak))`` (each frame's
        spectrum and mel are computed alike, the reflected edges are taken from the whole waveform, and the
        ``top_db`` floor is the whole track's), holding one chunk's STFT at a time (8 MB for 2,048 frames at
        the default settings) and not the whole track's with its intermediates (about 20 MB per minute of
        16 kHz audio; ``benchmarks/bench_decode_memory.py`` measures the two ways, decoding included). They are the
        same to the bit where the matrix product rounds a chunk's frames as it rounds the whole's: on this
        project's machines for chunks of 12 frames or more (fewer go another way through BLAS). So the chunks
        are of even length, at least half of ``chunk_frames`` (64 or more) where there are two or more, and
        none is a short remainder.
        """
        waveform = np.asarray(waveform)
        if waveform.ndim != 1 or waveform.shape[0] <= self.n_fft // 2:
            raise ValueError(f"LogMel.track needs one waveform of shape (T,) with T > n_fft // 2 = {self.n_fft // 2} "
                             f"samples, got shape {waveform.shape}")
        if int(chunk_frames) != chunk_frames or chunk_frames < 64:
            raise ValueError(f"chunk_frames must be an integer of 64 or more, got {chunk_frames!r}")
        samples, hop, pad = waveform.shape[0], self.hop_length, self.n_fft // 2
        divisor = None if peak is None else np.float32(peak)
        frames = (samples + 2 * pad - self.n_fft) // hop + 1  # torch.stft's count (num_frames' for an even n_fft)
        decibels = np.empty((self.n_mels, frames), dtype=np.float32)
        filters = self.filters.float().cpu()
        window = (torch.hann_window(self.n_fft, periodic=True)  # a half-precision one rebuilt, as forward does
                  if self.window.dtype in (torch.float16, torch.bfloat16) else self.window.float().cpu())
        chunks = -(-frames // int(chunk_frames))
        bounds = [frames * number // chunks for number in range(chunks + 1)]  # even: none short, as a remainder would be
        for start, stop in zip(bounds[:-1], bounds[1:]):
            first, end = start * hop - pad, (stop - 1) * hop + self.n_fft - pad  # its samples [first, end)
            parts = []
            if first < 0:  # reflected as torch.stft's centring reflects the whole waveform: sample -k is sample k
                parts.append(waveform[1:1 - first][::-1])
            parts.append(waveform[max(first, 0):min(end, samples)])
            if end > samples:  # and sample T - 1 + k is sample T - 1 - k
                parts.append(waveform[2 * samples - 1 - end:samples - 1][::-1])
            chunk = np.concatenate(parts)
            if divisor is not None:
                chunk = chunk / divisor  # (before the cast, as waveform / np.float32(peak) is computed)
            chunk = chunk.astype(np.float32, copy=False)
            with torch.no_grad(), torch.autocast(device_type="cpu", enabled=False):
                spectrum = torch.stft(torch.from_numpy(np.ascontiguousarray(chunk)), self.n_fft, hop_length=hop,
                                      window=window, center=False, return_complex=True)
                power = spectrum.real.square() + spectrum.imag.square()
                power = power / self.window_energy
                mel = torch.matmul(filters, power)
                decibels[:, start:stop] = (10.0 * torch.log10(mel.clamp_min(1e-10))).numpy()
        if self.top_db is not None:
            np.maximum(decibels, decibels.max() - np.float32(self.top_db), out=decibels)
        return decibels
