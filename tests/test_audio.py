"""The audio front-end against independent references.

References: the Slaney mel scale and filterbank written out here from their definition, a direct
numpy log-mel computation, librosa (a test dependency: `pip install -e ".[test]"`) and torchaudio
when installed (its CPU build is not installable here, so those tests skip), and analytic signals
(sines) written with soundfile.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from musicssl.audio import AudioError, LogMel, hz_to_mel, load_audio, mel_filterbank, mel_to_hz, resample

SAMPLE_RATE = 16000


# --------------------------------------------------------------------------------------------------
# Independent references


def slaney_mel(frequency_hz: float) -> float:
    """Slaney's mel scale from its definition: 3 mel per 200 Hz up to 1 kHz (15 mel), then a
    logarithmic step of ln(6.4) / 27 per mel."""
    if frequency_hz < 1000.0:
        return 3.0 * frequency_hz / 200.0
    return 15.0 + math.log(frequency_hz / 1000.0) / (math.log(6.4) / 27.0)


def slaney_hz(mel: float) -> float:
    """Inverse of :func:`slaney_mel`."""
    if mel < 15.0:
        return 200.0 * mel / 3.0
    return 1000.0 * math.exp((mel - 15.0) * math.log(6.4) / 27.0)


def reference_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float, area_normalise: bool = True
) -> np.ndarray:
    """Triangular filters between consecutive points equally spaced in Slaney mel, filter by filter
    and bin by bin; each scaled by 2 / (f_{i+2} - f_i) for unit area when ``area_normalise``."""
    mel_low, mel_high = slaney_mel(f_min), slaney_mel(f_max)
    edges = [slaney_hz(mel_low + (mel_high - mel_low) * k / (n_mels + 1)) for k in range(n_mels + 2)]
    n_bins = n_fft // 2 + 1
    weights = np.zeros((n_mels, n_bins))
    for i in range(n_mels):
        left, centre, right = edges[i], edges[i + 1], edges[i + 2]
        for k in range(n_bins):
            frequency = k * sample_rate / n_fft
            if left <= frequency <= centre:
                weights[i, k] = (frequency - left) / (centre - left)
            elif centre < frequency <= right:
                weights[i, k] = (right - frequency) / (right - centre)
        if area_normalise:
            weights[i] *= 2.0 / (right - left)
    return weights


def reference_log_mel(signal: np.ndarray, filters: np.ndarray, n_fft: int, hop: int, top_db: float) -> np.ndarray:
    """Direct numpy log-mel in float64: reflect-padded centred frames, periodic Hann window,
    |rfft|^2 divided by the window's energy, mel matmul, 10 log10, floor top_db below the maximum."""
    padded = np.pad(signal.astype(np.float64), n_fft // 2, mode="reflect")
    n_frames = 1 + (len(padded) - n_fft) // hop
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)
    frames = np.stack([padded[t * hop : t * hop + n_fft] * window for t in range(n_frames)], axis=1)
    power = np.abs(np.fft.rfft(frames, axis=0)) ** 2 / np.sum(window**2)
    decibels = 10.0 * np.log10(np.maximum(filters @ power, 1e-10))
    return np.maximum(decibels, decibels.max() - top_db)


@pytest.fixture(scope="module")
def music() -> bytes:
    """About 4 s of real music at 16 kHz: piano and drums from the General MIDI SoundFont that ships
    with pretty_midi, rendered by midirenderer (48 kHz stereo) and decoded by load_audio."""
    import midirenderer
    import pretty_midi

    soundfont = Path(pretty_midi.__file__).parent / "TimGM6mb.sf2"
    song = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(program=0)
    for step, pitch in enumerate([60, 64, 67, 72, 71, 67, 64, 62]):
        piano.notes.append(pretty_midi.Note(velocity=90, pitch=pitch, start=0.5 * step, end=0.5 * step + 0.6))
    drums = pretty_midi.Instrument(program=0, is_drum=True)
    for step in range(16):
        drums.notes.append(
            pretty_midi.Note(velocity=100, pitch=36 if step % 4 == 0 else 42, start=0.25 * step, end=0.25 * step + 0.1)
        )
    song.instruments += [piano, drums]
    midi = io.BytesIO()
    song.write(midi)
    wav = midirenderer.render_wave_from(soundfont.read_bytes(), midi.getvalue())
    return wav


@pytest.fixture(scope="module")
def music_16k(music: bytes, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    path = tmp_path_factory.mktemp("music") / "song.wav"
    path.write_bytes(music)
    signal = load_audio(path, SAMPLE_RATE)
    assert signal.dtype == np.float32 and np.abs(signal).max() > 0.01
    return signal


# --------------------------------------------------------------------------------------------------
# Mel scale and filterbank


def test_slaney_mel_scale_anchor_points_and_inverse():
    # 200 Hz -> 3 mel, 1 kHz -> 15 mel, and 6.4 kHz is exactly 27 log steps above 1 kHz -> 42 mel.
    np.testing.assert_allclose(hz_to_mel([0.0, 200.0, 1000.0, 6400.0]), [0.0, 3.0, 15.0, 42.0], rtol=0, atol=1e-12)
    frequencies = np.array([0.0, 20.0, 440.0, 999.0, 1000.0, 1001.0, 3000.0, 8000.0, 11025.0])
    np.testing.assert_allclose(hz_to_mel(frequencies), [slaney_mel(f) for f in frequencies], rtol=1e-12)
    mels = np.linspace(0.0, 50.0, 101)
    np.testing.assert_allclose(mel_to_hz(mels), [slaney_hz(m) for m in mels], rtol=1e-12)
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(frequencies)), frequencies, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize(
    ("sample_rate", "n_fft", "n_mels", "f_min", "f_max", "norm"),
    [
        (16000, 1024, 128, 0.0, None, "slaney"),  # the project's front-end
        (16000, 1024, 128, 0.0, None, None),
        (22050, 2048, 96, 30.0, 8000.0, "slaney"),
        (16000, 512, 40, 300.0, 3400.0, "slaney"),
    ],
)
def test_mel_filterbank_matches_formula(sample_rate, n_fft, n_mels, f_min, f_max, norm):
    filters = mel_filterbank(sample_rate, n_fft, n_mels, f_min, f_max, norm)
    expected = reference_filterbank(
        sample_rate, n_fft, n_mels, f_min, sample_rate / 2 if f_max is None else f_max, norm == "slaney"
    )
    assert filters.shape == (n_mels, n_fft // 2 + 1)
    np.testing.assert_allclose(filters, expected, rtol=1e-9, atol=1e-12)
    if norm is None:
        assert filters.max() <= 1.0 + 1e-12
    # every filter covers at least one FFT bin at these resolutions
    assert (filters.max(axis=1) > 0).all()


def test_study_f_max_above_nyquist_leaves_11_empty_filters():
    # The study's f_max = 11025 Hz at 16 kHz: the top 11 of 128 filters lie above Nyquist.
    filters = mel_filterbank(16000, 1024, 128, 0.0, 11025.0)
    empty = np.flatnonzero(filters.max(axis=1) == 0)
    np.testing.assert_array_equal(empty, np.arange(117, 128))
    np.testing.assert_allclose(filters, reference_filterbank(16000, 1024, 128, 0.0, 11025.0), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("f_min", "f_max"), [(-1.0, None), (8000.0, 8000.0), (500.0, 100.0)])
def test_mel_filterbank_rejects_bad_frequency_range(f_min, f_max):
    with pytest.raises(ValueError, match="f_min"):
        mel_filterbank(16000, 1024, 128, f_min, f_max)
    with pytest.raises(ValueError, match="norm"):
        mel_filterbank(16000, 1024, 128, norm="area")


@pytest.mark.parametrize(
    ("sample_rate", "n_fft", "n_mels", "f_min", "f_max"),
    [(16000, 1024, 128, 0.0, None), (22050, 2048, 96, 30.0, 8000.0), (16000, 1024, 128, 0.0, 11025.0)],
)
def test_mel_filterbank_matches_librosa(sample_rate, n_fft, n_mels, f_min, f_max):
    librosa = pytest.importorskip("librosa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # librosa warns about the empty filters above Nyquist
        expected = librosa.filters.mel(
            sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=f_min, fmax=f_max, htk=False, norm="slaney",
            dtype=np.float64,
        )
    filters = mel_filterbank(sample_rate, n_fft, n_mels, f_min, f_max)
    np.testing.assert_allclose(filters, expected, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# LogMel


def test_log_mel_shape_for_a_4_second_view():
    front_end = LogMel()
    view = torch.randn(4 * SAMPLE_RATE, generator=torch.Generator().manual_seed(0))
    output = front_end(view)
    assert output.shape == (128, 126)
    assert output.dtype == torch.float32
    assert front_end.num_frames(4 * SAMPLE_RATE) == 126


def test_log_mel_batched_shapes_and_rows_independent():
    front_end = LogMel()
    generator = torch.Generator().manual_seed(1)
    # rows of very different loudness so that a batch-wide top_db floor would show
    waveforms = torch.randn(2, 3, 20000, generator=generator) * torch.tensor([1.0, 1e-2, 1e-4]).view(1, 3, 1)
    frames = front_end.num_frames(20000)
    assert front_end(waveforms).shape == (2, 3, 128, frames)
    assert front_end(waveforms[:, 0]).shape == (2, 128, frames)
    batched = front_end(waveforms)
    for b in range(2):
        for c in range(3):
            torch.testing.assert_close(batched[b, c], front_end(waveforms[b, c]), rtol=0, atol=1e-4)


def test_log_mel_matches_direct_numpy_computation(music_16k):
    front_end = LogMel()
    filters = reference_filterbank(SAMPLE_RATE, 1024, 128, 0.0, SAMPLE_RATE / 2)
    signal = music_16k[: 4 * SAMPLE_RATE]
    expected = reference_log_mel(signal, filters, n_fft=1024, hop=512, top_db=100.0)
    output = front_end(torch.from_numpy(signal)).double().numpy()
    assert output.shape == expected.shape == (128, 126)
    # the music spans well over 60 dB, so this is not a comparison of floors
    assert expected.max() - np.median(expected) > 20
    np.testing.assert_allclose(output, expected, rtol=0, atol=1e-3)


def test_log_mel_matches_librosa(music_16k):
    librosa = pytest.importorskip("librosa")
    signal = music_16k[: 4 * SAMPLE_RATE]
    window_energy = np.sum(librosa.filters.get_window("hann", 1024, fftbins=True) ** 2)
    power = librosa.feature.melspectrogram(
        y=signal.astype(np.float64), sr=SAMPLE_RATE, n_fft=1024, hop_length=512, window="hann", center=True,
        pad_mode="reflect", power=2.0, n_mels=128, htk=False, norm="slaney",
    )
    expected = librosa.power_to_db(power / window_energy, ref=1.0, amin=1e-10, top_db=100.0)
    output = LogMel()(torch.from_numpy(signal)).double().numpy()
    np.testing.assert_allclose(output, expected, rtol=0, atol=1e-3)


def test_log_mel_matches_torchaudio(music_16k):
    torchaudio = pytest.importorskip("torchaudio")
    signal = torch.from_numpy(music_16k[: 4 * SAMPLE_RATE])
    spectrogram = torchaudio.transforms.MelSpectrogram(
        sample_rate=SAMPLE_RATE, n_fft=1024, hop_length=512, n_mels=128, power=2.0, normalized=True,
        center=True, pad_mode="reflect", norm="slaney", mel_scale="slaney",
    )
    expected = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=100.0)(spectrogram(signal))
    torch.testing.assert_close(LogMel()(signal), expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize("band", [10, 40, 80, 110, 125])
def test_sine_peaks_in_the_mel_band_containing_its_frequency(band):
    # Put the tone at the centre of `band` (from the reference scale, not the module's) so that
    # this band, and only this band, contains it at full weight.
    mel_high = slaney_mel(SAMPLE_RATE / 2)
    frequency = slaney_hz(mel_high * (band + 1) / 129)
    time = torch.arange(2 * SAMPLE_RATE, dtype=torch.float64) / SAMPLE_RATE
    tone = (0.5 * torch.sin(2 * math.pi * frequency * time)).float()
    decibels = LogMel()(tone)[:, 2:-2]  # skip the edge frames (reflect padding)
    per_band = decibels.mean(dim=1)
    assert int(per_band.argmax()) == band
    assert (decibels.argmax(dim=0) == band).all()
    far = torch.cat([per_band[: max(band - 4, 0)], per_band[band + 5 :]])
    assert per_band[band] - far.max() > 30.0


def test_top_db_floor_is_applied_per_example():
    time = torch.arange(SAMPLE_RATE, dtype=torch.float64) / SAMPLE_RATE
    tone = torch.sin(2 * math.pi * 1000.0 * time).float()
    # 60 dB apart; both peaks above 0 dB so that the floors sit above the 1e-10 power clamp (-100 dB)
    batch = torch.stack([1000.0 * tone, tone])
    decibels = LogMel(top_db=100.0)(batch)
    loud_peak, quiet_peak = decibels[0].max(), decibels[1].max()
    assert float(quiet_peak) > 0.0
    assert float(loud_peak - quiet_peak) == pytest.approx(60.0, abs=0.01)
    # each example reaches its own floor, 100 dB below its own maximum (a batch-wide floor would
    # put the quiet example's floor only 40 dB below its maximum)
    for example, peak in ((decibels[0], loud_peak), (decibels[1], quiet_peak)):
        assert float(example.min()) == pytest.approx(float(peak) - 100.0, abs=1e-4)
    unfloored = LogMel(top_db=None)(batch)
    assert float(unfloored[1].max() - unfloored[1].min()) > 100.0


def test_log_mel_under_bfloat16_autocast_matches_float32(music_16k):
    front_end = LogMel()
    signal = torch.from_numpy(music_16k[: 4 * SAMPLE_RATE]).unsqueeze(0)
    reference = front_end(signal)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        output = front_end(signal)
        output_from_bf16_input = front_end(signal.bfloat16())
    assert output.dtype == torch.float32
    torch.testing.assert_close(output, reference, rtol=0, atol=1e-4)
    # a bfloat16 waveform carries ~3 significant digits, so only loud bands are comparable closely
    loud = reference > reference.max() - 40
    assert float((output_from_bf16_input - reference)[loud].abs().max()) < 0.5


def test_log_mel_module_cast_to_bfloat16_still_runs(music_16k):
    # Lightning's "bf16-true" precision casts every floating buffer; the filters then carry bf16
    # rounding (~0.4 %), which is a few hundredths of a dB.
    signal = torch.from_numpy(music_16k[: 4 * SAMPLE_RATE])
    reference = LogMel()(signal)
    output = LogMel().to(torch.bfloat16)(signal)
    loud = reference > reference.max() - 60
    assert float((output - reference)[loud].abs().max()) < 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_log_mel_on_cuda_matches_cpu(music_16k):
    signal = torch.from_numpy(music_16k[: 4 * SAMPLE_RATE]).repeat(4, 1)
    reference = LogMel()(signal)
    front_end = LogMel().cuda()
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        output = front_end(signal.cuda())
    assert output.dtype == torch.float32
    torch.testing.assert_close(output.cpu(), reference, rtol=0, atol=1e-2)


def test_log_mel_rejects_too_short_input():
    with pytest.raises(ValueError, match="n_fft // 2"):
        LogMel()(torch.zeros(2, 300))
    with pytest.raises(ValueError, match="shape"):
        LogMel()(torch.tensor(1.0))


@pytest.mark.parametrize("samples", [1025, 7 * SAMPLE_RATE + 123, 512 * 4096 - 1, 512 * 4096, 512 * 4096 + 1])
@pytest.mark.parametrize("settings", [{}, {"n_fft": 512, "hop_length": 160, "n_mels": 64, "f_max": 11025.0,
                                           "norm": None}, {"top_db": None}, {"n_fft": 401, "hop_length": 160}])
def test_log_mel_of_a_track_a_chunk_at_a_time_is_the_modules_on_the_whole_track(music_16k, samples, settings):
    """LogMel.track (the mel cache's way: a chunk of frames at a time, not the whole track's STFT) gives
    the numbers of the module on the whole peak-normalised waveform, to the bit: reflected edges, chunk
    seams, a last frame alone past a chunk's end (512 x 4096 samples), and the floor below the whole track's
    loudest bin (the music is tiled with a gain rising 40 dB, so the floor of a quiet chunk is not its own)."""
    repeats = -(-samples // len(music_16k))
    gain = np.repeat(np.logspace(-2, 0, repeats), len(music_16k))[:samples].astype(np.float32)
    waveform = np.tile(music_16k, repeats)[:samples] * gain
    peak = float(np.abs(waveform).max())
    front_end = LogMel(**settings)
    with torch.no_grad():
        whole = front_end(torch.from_numpy(waveform / np.float32(peak))).numpy()
        unscaled = front_end(torch.from_numpy(waveform)).numpy()
    pad = front_end.n_fft // 2  # (torch.stft's count of centred frames; samples // hop + 1 for an even n_fft)
    frames = (samples + 2 * pad - front_end.n_fft) // front_end.hop_length + 1
    assert whole.shape == (front_end.n_mels, frames)
    for chunk_frames in (64, 100, 2048, max(frames, 64)):
        track = front_end.track(waveform, peak, chunk_frames=chunk_frames)
        assert track.dtype == np.float32 and track.shape == whole.shape
        np.testing.assert_array_equal(track, whole, err_msg=f"chunks of at most {chunk_frames} frames")
    np.testing.assert_array_equal(front_end.track(waveform), unscaled)  # no peak: the waveform as it is
    if not settings and samples > SAMPLE_RATE:
        # (Check that the floor matters here: floored per chunk, the quiet start would keep bins below it.)
        assert (whole == whole.max() - 100.0).mean() > 0.01


def test_log_mel_track_divides_as_forwards_input_was_divided_and_keeps_a_half_precision_modules_window(music_16k):
    """A float64 waveform is divided by the peak in float64 (as ``waveform / np.float32(peak)`` is) before it
    is cast; a module cast to bfloat16 rebuilds its Hann window in float32, as forward does."""
    waveform = np.tile(music_16k.astype(np.float64) * (1 + 1e-9), 3)
    with torch.no_grad():
        expected = LogMel()(torch.from_numpy(waveform / np.float32(0.7)).float()).numpy()
    np.testing.assert_array_equal(LogMel().track(waveform, 0.7, chunk_frames=64), expected)
    half = LogMel().to(torch.bfloat16)
    with torch.no_grad():
        expected = half(torch.from_numpy(music_16k)).float().numpy()
    np.testing.assert_array_equal(half.track(music_16k, chunk_frames=64), expected)


def test_log_mel_track_rejects_what_forward_rejects_and_a_bad_chunk_size():
    with pytest.raises(ValueError, match=r"T > n_fft // 2 = 512 samples, got shape \(512,\)"):
        LogMel().track(np.zeros(512, dtype=np.float32))
    with pytest.raises(ValueError, match=r"one waveform of shape \(T,\)"):
        LogMel().track(np.zeros((2, 4000), dtype=np.float32))
    for chunk_frames in (0, 63, 100.5):
        with pytest.raises(ValueError, match=f"chunk_frames must be an integer of 64 or more, got {chunk_frames}"):
            LogMel().track(np.zeros(4000, dtype=np.float32), chunk_frames=chunk_frames)


# --------------------------------------------------------------------------------------------------
# load_audio


def stereo_sine(sample_rate: int, seconds: float, frequency: float) -> np.ndarray:
    """Left 0.8 sin, right 0.4 sin: the mono mix is 0.6 sin."""
    time = np.arange(int(round(seconds * sample_rate))) / sample_rate
    wave = np.sin(2 * np.pi * frequency * time)
    return np.stack([0.8 * wave, 0.4 * wave], axis=1).astype(np.float32)


@pytest.mark.parametrize(
    ("file_format", "subtype", "suffix", "sample_rate", "max_error"),
    [
        ("WAV", "PCM_16", ".wav", 44100, 1e-3),
        ("WAV", "FLOAT", ".wav", 44100, 1e-3),
        ("FLAC", "PCM_24", ".flac", 44100, 1e-3),
        ("OGG", "VORBIS", ".ogg", 44100, 0.05),  # lossy: compare looser
        ("OGG", "OPUS", ".opus", 48000, 0.05),
        ("MP3", "MPEG_LAYER_III", ".mp3", 44100, 0.05),
    ],
)
def test_load_audio_decodes_downmixes_and_resamples(tmp_path, file_format, subtype, suffix, sample_rate, max_error):
    if file_format not in soundfile.available_formats() or subtype not in soundfile.available_subtypes(file_format):
        pytest.skip(f"this libsndfile cannot write {file_format}/{subtype}")
    path = tmp_path / f"tone{suffix}"
    frequency = 440.0
    soundfile.write(path, stereo_sine(sample_rate, 2.0, frequency), sample_rate, format=file_format, subtype=subtype)

    signal = load_audio(path, SAMPLE_RATE)

    assert signal.dtype == np.float32 and signal.ndim == 1
    assert abs(len(signal) - 2 * SAMPLE_RATE) <= 4
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    assert np.argmax(spectrum) * SAMPLE_RATE / len(signal) == pytest.approx(frequency, abs=1.0)
    # sample by sample against the analytic mono mix, away from the edges (resampler/codec ramps)
    expected = 0.6 * np.sin(2 * np.pi * frequency * np.arange(len(signal)) / SAMPLE_RATE)
    inner = slice(400, len(signal) - 400)
    assert np.abs(signal[inner] - expected[inner]).max() < max_error


def whole_file_samples(path: Path, sample_rate: int) -> np.ndarray:
    """What load_audio must give, from its definition: the whole file read at once, the mean of its
    channels, and soxr's one-shot resampling (high quality) of the whole."""
    import soxr

    data, rate = soundfile.read(path, dtype="float32", always_2d=True)
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if rate == sample_rate:
        return mono
    return soxr.resample(mono, rate, sample_rate, quality="HQ").astype(np.float32, copy=False)


@pytest.mark.parametrize(
    ("name", "rate", "channels", "frames", "subtype"),
    [
        ("a.flac", 44100, 2, 44100 * 3 + 17, "PCM_16"),
        ("b.wav", 48000, 2, 48000 * 2 + 1, "FLOAT"),
        ("c.wav", 22050, 1, 22050 * 2 + 3, "PCM_16"),
        ("d.ogg", 44100, 2, 44100 * 2 + 5, "VORBIS"),
        ("e.mp3", 44100, 2, 44100 * 2, "MPEG_LAYER_III"),
        # (Read with SoundFile.read a block at a time, these two gave other samples and a click at each block's
        # end: its seek after each read resynchronised the MP3 decoder.)
        ("e22.mp3", 22050, 1, 22050 * 2, "MPEG_LAYER_III"),
        ("e16.mp3", 16000, 1, 16000 * 2 + 7, "MPEG_LAYER_III"),
        ("f.wav", 16000, 1, 16000 * 2, "PCM_16"),  # no resampling
        ("g.wav", 8000, 6, 8000 * 2 + 1, "PCM_16"),  # upsampled; six channels
        ("h.wav", 44100, 2, 3000, "PCM_16"),  # exactly three blocks of 1,000
    ],
)
def test_load_audio_a_block_at_a_time_gives_the_whole_files_samples_to_the_bit(tmp_path, monkeypatch, name, rate,
                                                                              channels, frames, subtype):
    """load_audio decodes 1,000 frames at a time here (2^18 by default), through a soxr stream: the same
    samples as the whole file read, mixed and resampled at once, at 16 and 22.05 kHz; and from files cut
    short (their headers list more frames than they hold), the same as the whole read gives them."""
    import musicssl.audio

    monkeypatch.setattr(musicssl.audio, "DECODE_BLOCK_FRAMES", 1000)
    rng = np.random.default_rng(frames)
    path = tmp_path / name
    soundfile.write(path, (0.2 * rng.standard_normal((frames, channels))).clip(-1, 1), rate, subtype=subtype)
    for target in (SAMPLE_RATE, 22050):
        expected = whole_file_samples(path, target)
        signal = load_audio(path, target)
        assert signal.dtype == np.float32 and signal.shape == expected.shape
        np.testing.assert_array_equal(signal, expected)
        assert signal.base is None or len(signal.base) <= len(signal) + 17  # (no spare array of the listed length)
    if not name.endswith(".flac"):  # (a FLAC cut short does not decode, read whole or not: below)
        cut = tmp_path / f"cut-{name}"
        cut.write_bytes(path.read_bytes()[: path.stat().st_size * 3 // 5])
        expected = whole_file_samples(cut, SAMPLE_RATE)
        assert 0 < len(expected) < 0.7 * len(whole_file_samples(path, SAMPLE_RATE))
        np.testing.assert_array_equal(load_audio(cut, SAMPLE_RATE), expected)


def test_without_the_block_reads_soundfile_a_file_is_read_whole_with_the_same_samples(tmp_path, monkeypatch):
    """Where soundfile lacks what reading libsndfile's blocks directly takes, a file is read in one piece."""
    import musicssl.audio

    monkeypatch.setattr(musicssl.audio, "DECODE_BLOCK_FRAMES", 1000)
    monkeypatch.setattr(musicssl.audio, "_READS_BLOCKS", False)
    reads = []
    monkeypatch.setattr(soundfile.SoundFile, "read",
                        lambda self, *args, _read=soundfile.SoundFile.read, **kwargs: reads.append(1) or _read(self, *args,
                                                                                                               **kwargs))
    path = tmp_path / "song.mp3"
    soundfile.write(path, 0.3 * np.sin(np.arange(22050 * 2) * 0.05), 22050, subtype="MPEG_LAYER_III")
    signal = load_audio(path, SAMPLE_RATE)
    assert len(reads) == 1
    np.testing.assert_array_equal(signal, whole_file_samples(path, SAMPLE_RATE))


def test_a_flac_cut_short_does_not_decode_read_whole_or_a_block_at_a_time(tmp_path):
    path = tmp_path / "song.flac"
    soundfile.write(path, 0.2 * np.random.default_rng(0).standard_normal((44100 * 9, 2)), 44100)
    cut = write_bytes(tmp_path / "cut.flac", path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(soundfile.LibsndfileError, match="lost sync"):
        whole_file_samples(cut, SAMPLE_RATE)
    with pytest.raises(AudioError, match=r"cut.flac: cannot decode audio: .*or corrupt \(libsndfile: .*lost sync"):
        load_audio(cut)  # (its first blocks decode: the error comes at the cut)


def test_load_audio_holds_a_block_of_the_file_not_the_whole(tmp_path):
    """A minute of 44.1 kHz stereo is 21 MB of float32 samples, read whole before, beside their down-mix (11 MB)
    and the 16 kHz result (3.8 MB): a peak of 35 MB. Decoded a block at a time, the peak is the result and
    about 3 MB for a block (numpy's arrays, as tracemalloc counts them)."""
    import tracemalloc

    path = tmp_path / "minute.flac"
    soundfile.write(path, 0.2 * np.random.default_rng(0).standard_normal((44100 * 60, 2)), 44100)
    tracemalloc.start()
    try:
        signal = load_audio(path, SAMPLE_RATE)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        whole_file_samples(path, SAMPLE_RATE)
        _, peak_whole = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert signal.nbytes == 60 * SAMPLE_RATE * 4
    assert peak_whole > 8 * signal.nbytes  # (the way before, measured alike)
    assert peak < signal.nbytes + 4e6, (peak, peak_whole)


def test_load_audio_other_target_rate_and_mono_file(tmp_path):
    path = tmp_path / "mono.flac"
    soundfile.write(path, stereo_sine(44100, 1.0, 1000.0)[:, 0], 44100)
    signal = load_audio(path, sample_rate=22050)
    assert abs(len(signal) - 22050) <= 4
    expected = 0.8 * np.sin(2 * np.pi * 1000.0 * np.arange(len(signal)) / 22050)
    assert np.abs(signal[400:-400] - expected[400:-400]).max() < 1e-3


def test_load_audio_decodes_rendered_music(music, tmp_path):
    path = tmp_path / "song.wav"
    path.write_bytes(music)
    stereo, native_rate = soundfile.read(path, dtype="float64")
    signal = load_audio(path, SAMPLE_RATE)
    assert abs(len(signal) - len(stereo) * SAMPLE_RATE / native_rate) <= 4
    # energy of the mono mix is preserved by resampling (no content above 8 kHz to speak of lost)
    mono = stereo.mean(axis=1)
    assert np.mean(signal.astype(np.float64) ** 2) == pytest.approx(np.mean(mono**2), rel=0.05)


def write_bytes(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("make_path", "reason"),
    [
        (lambda d: d / "missing.wav", "no such file"),
        (lambda d: d, "directory"),
        (lambda d: write_bytes(d / "empty.wav", b""), "empty"),
        (lambda d: write_bytes(d / "noise.wav", np.random.default_rng(0).bytes(4096)), "cannot decode"),
        (lambda d: write_bytes(d / "noise.mp3", np.random.default_rng(1).bytes(4096)), "cannot decode"),
        (lambda d: write_bytes(d / "notes.txt", b"not audio at all\n" * 50), "cannot decode"),
        (lambda d: write_bytes(d / "notes.flac", b"not audio at all\n" * 50), "cannot decode"),
    ],
)
def test_load_audio_errors_name_the_file_and_the_reason(tmp_path, make_path, reason):
    path = make_path(tmp_path)
    with pytest.raises(AudioError) as raised:
        load_audio(path)
    assert str(path) in str(raised.value)
    assert reason in str(raised.value)


def test_an_undecodable_files_reason_keeps_libsndfiles_detail_only_where_it_is_true(tmp_path):
    """libsndfile says that an MP3 it cannot decode "does not exist"; the file is there, so that is
    dropped. Its reason for a WAV that is not one is kept, without the path it repeats."""
    mp3 = write_bytes(tmp_path / "noise.mp3", np.random.default_rng(1).bytes(4096))
    with pytest.raises(AudioError) as raised:
        load_audio(mp3)
    assert str(raised.value) == f"{mp3}: cannot decode audio: not a readable WAV/FLAC/OGG/MP3 file, or corrupt"
    truncated = write_bytes(tmp_path / "truncated.wav", b"RIFF\x24\x00\x00\x00WAVEfmt ")
    with pytest.raises(AudioError) as raised:
        load_audio(truncated)
    message = str(raised.value)
    assert message.startswith(f"{truncated}: cannot decode audio: not a readable WAV/FLAC/OGG/MP3 file, or corrupt "
                              "(libsndfile: ")
    assert message.count(str(truncated)) == 1 and "does not exist" not in message


def test_a_file_of_a_format_not_read_here_is_named_as_such_and_one_only_named_so_decodes(tmp_path):
    """Before: an AAC .m4a (iTunes) was "not a readable WAV/FLAC/OGG/MP3 file, or corrupt", as if damaged."""
    m4a = write_bytes(tmp_path / "song.M4A", b"\x00\x00\x00\x20ftypM4A \x00\x00\x02\x00" + bytes(64))
    with pytest.raises(AudioError) as raised:
        load_audio(m4a)
    assert str(raised.value) == (f"{m4a}: cannot decode audio: a .m4a file, a format not read here (WAV, FLAC, "
                                 "OGG/Vorbis/Opus, MP3, AIFF); convert to FLAC or WAV, e.g. ffmpeg -i IN.m4a OUT.flac")
    flac = tmp_path / "flac.m4a"  # libsndfile reads a file's content, whatever its name says
    soundfile.write(flac, np.zeros(1600, dtype=np.float32), 16000, format="FLAC")
    assert load_audio(flac).shape == (1600,)


def test_load_audio_refuses_a_header_sample_rate_no_audio_has(tmp_path):
    """A WAV whose header says 1 Hz: resampling it to 16 kHz asked soxr for 16,000 times its samples and
    killed the process (a segfault, or std::bad_alloc), which decoding in the calling process (workers=0)
    does not survive. It is an undecodable file now, named with the reason."""
    import struct

    path = tmp_path / "damaged.wav"
    soundfile.write(path, stereo_sine(16000, 10.0, 440.0)[:, 0], 16000)
    content = bytearray(path.read_bytes())
    assert struct.unpack("<I", content[24:28]) == (16000,)  # the fmt chunk's sample rate
    content[24:28] = struct.pack("<I", 1)
    path.write_bytes(bytes(content))
    with pytest.raises(AudioError, match=r"damaged.wav: its header gives a sample rate of 1 Hz, below any audio's "
                                         r"\(1000 Hz\): a damaged header, or not audio"):
        load_audio(path)
    soundfile.write(path, stereo_sine(8000, 0.5, 440.0), 8000)  # telephone audio is fine
    assert load_audio(path).shape == (8000,)


def test_load_audio_rejects_a_bad_sample_rate(tmp_path):
    path = tmp_path / "tone.wav"
    soundfile.write(path, stereo_sine(16000, 0.1, 440.0), 16000)
    with pytest.raises(ValueError, match="sample_rate"):
        load_audio(path, sample_rate=0)


def test_resampling_keeps_the_passband_and_stops_what_would_alias():
    """44.1 kHz to 16 kHz: a 7 kHz tone (below the new Nyquist, 8 kHz) keeps its level, RMS 1/sqrt(2) of a unit
    sine; a 10 kHz one (above it) is removed, not folded to 6 kHz. soxr's low-quality setting lets the first
    fall to 0.15 and a quick one lets the second through at 0.67."""
    seconds = np.arange(44100) / 44100

    def rms_after(frequency: float) -> float:
        out = resample(np.sin(2 * np.pi * frequency * seconds), 44100, 16000)
        inner = out[800:-800].astype(np.float64)  # away from the ramps at the edges
        return float(np.sqrt(np.mean(inner ** 2)))

    assert rms_after(7000.0) == pytest.approx(1 / np.sqrt(2), rel=0.02)
    assert rms_after(10000.0) < 1e-3
