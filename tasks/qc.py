"""Picture QC in the Prefect UI: the per-segment table (identity, lip-sync proxy) as an artifact."""

from __future__ import annotations

from prefect.artifacts import create_table_artifact


def picture_artifact(qc_report: dict, key: str) -> None:
    """The per-segment picture QC (identity, lip-sync proxy) as a table artifact in the Prefect UI."""
    picture = qc_report.get("picture")
    if not picture:
        return
    rows = []
    for seg in picture["segments"]:
        ident, lip = seg["identity"], seg["lip_sync"] or {}
        rows.append(
            {
                "segment": seg["index"],
                "start_s": seg["start_s"],
                "end_s": seg["end_s"],
                "identity samples": f"{len(ident['samples'])} ({ident['measured']} measured)",
                "identity median": ident.get("median"),
                "identity worst": ident.get("worst"),
                "worst at s": ident.get("worst_at_s"),
                "faces missing": ident["faces_missing"],
                "identity": ident["passed"],
                "lip-sync proxy lag": lip.get("lag_frames"),
                "correlation": lip.get("correlation"),
                "lip sync": lip.get("passed"),
            }
        )
    note = f" (picture gates skipped: {picture['skipped']})" if picture.get("skipped") else ""
    create_table_artifact(
        rows,
        key=f"picture-qc-{key[:16]}",
        description=f"Picture QC per segment{note}; failed: {qc_report['failed']}",
    )
