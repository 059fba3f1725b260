"""liveavatar_core: the production line's library (no Prefect imports).

Stages: storage (URLs), audio, segments, portrait, prompt, engines, media, qc, report, manifest.
"""

__version__ = "0.1.0"
