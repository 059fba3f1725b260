"""The line's fixed time base: 16 kHz mono audio, 25 fps video, so one frame is 640 samples."""

AUDIO_SAMPLE_RATE = 16_000
FPS = 25
SAMPLES_PER_FRAME = AUDIO_SAMPLE_RATE // FPS  # 640


def frames_for_samples(samples: int) -> int:
    """Video frames that cover `samples` audio samples (the last partial frame counts)."""
    return -(-samples // SAMPLES_PER_FRAME)


def seconds_to_frame(seconds: float) -> int:
    """Nearest frame boundary to a time in seconds."""
    return round(seconds * FPS)
