"""What a finished lecture run leaves on its Prefect page: links to the results, the QC and segment tables.

Artifacts are keyed per lecture (its title and destination), so the Artifacts page keeps each
lecture's history across runs. S3 files are linked by presigned URLs (they expire; the files stay),
local files by their path on the worker's host.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from liveavatar_core import report, storage
from liveavatar_core.storage import s3

LINK_SECONDS = 7 * 24 * 3600  # the longest a SigV4 presigned URL may live


def lecture_key(title: str, out: str) -> str:
    """An artifact key for one lecture: its title in lowercase-dashes plus a hash of its destination."""
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:40].strip("-") or "lecture"
    return f"{slug}-{hashlib.sha256(out.encode()).hexdigest()[:6]}"


def share_link(url: str, seconds: int = LINK_SECONDS) -> str:
    """A link a person can open: a presigned GET URL for S3, the absolute file path for local files."""
    if storage.is_remote(url):
        loc = storage.parse_s3(url)
        return s3.client().generate_presigned_url(
            "get_object", Params={"Bucket": loc.bucket, "Key": loc.key}, ExpiresIn=seconds
        )
    return str(Path(storage.local_path(url)).resolve())


@task(name="lecture-artifacts")
def lecture_artifacts(
    files: dict[str, str], manifest: dict[str, Any], qc: dict[str, Any], published: bool
) -> dict[str, str]:
    """Create the run's result, QC and segment artifacts; returns {file name: link}."""
    title = str(manifest.get("lecture", {}).get("title") or "lecture")
    out = str(manifest.get("lecture", {}).get("destination") or "")
    key = lecture_key(title, out)
    links = {name: share_link(url) for name, url in files.items()}
    create_markdown_artifact(
        markdown=result_markdown(title, links, manifest, qc, published),
        key=key,
        description=f"{title}: {'published' if published else 'NOT published'}",
    )
    checks = [report.describe_check(c) for c in qc.get("checks", [])]
    create_table_artifact(
        table=[
            {"check": c["label"], "result": {True: "pass", False: "FAIL"}.get(c["passed"], "–"),
             "measured": c["value"], "allowed": c["limit"]}
            for c in checks
        ],
        key=f"{key}-qc",
        description=f"{title}: quality checks",
    )  # fmt: skip
    create_table_artifact(
        table=[_segment_row(s) for s in manifest.get("segments", [])],
        key=f"{key}-segments",
        description=f"{title}: segments",
    )
    return links


def result_markdown(
    title: str, links: dict[str, str], manifest: dict[str, Any], qc: dict[str, Any], published: bool
) -> str:
    """The run's result card: status, draft warning, check summary, one link per file, the numbers."""
    checks = qc.get("checks", [])
    failed = [report.describe_check(c)["label"] for c in checks if c.get("passed") is False]
    lines = [f"## {title}: {'published' if published else 'not published'}", ""]
    draft = report.is_draft(manifest)
    if draft:
        lines += [f"**DRAFT, not for publication:** {draft}.", ""]
    if failed:
        lines += [f"**{len(failed)} of {len(checks)} checks failed:** {'; '.join(failed)}.", ""]
    else:
        lines += [f"All {len(checks)} checks passed{' (on a draft)' if draft else ''}.", ""]
    lines += ["| file | open |", "| --- | --- |"]
    for name, link in links.items():
        target = f"[{name}]({link})" if link.startswith(("http://", "https://")) else f"`{link}`"
        lines.append(f"| {name} | {target} |")
    remote = any(link.startswith(("http://", "https://")) for link in links.values())
    lines.append("")
    if remote:
        lines.append(
            f"Links are presigned and work for {LINK_SECONDS // 86400} days; the files stay where they are."
        )
    else:
        lines.append("Paths are on the host of the worker that ran this flow.")
    output, engine = manifest.get("output", {}), manifest.get("engine", {})
    lines += [
        "",
        f"{report.clock(output.get('duration_s'))} · {output.get('width')}×{output.get('height')} · "
        f"{len(manifest.get('segments', []))} segments · engine {engine.get('name')} {engine.get('version')} · "
        f"seed {manifest.get('settings', {}).get('seed')}",
    ]
    return "\n".join(lines)


def _segment_row(seg: dict[str, Any]) -> dict[str, Any]:
    attempts = seg.get("attempts", [])
    return {
        "#": seg.get("index"),
        "start": report.clock(seg.get("start_s")),
        "end": report.clock(seg.get("end_s")),
        "frames": seg.get("frames"),
        "ends": seg.get("cut"),
        "reused": "yes" if seg.get("cached") else "no",
        "rung": attempts[-1].get("rung") if attempts else "–",
        "generation (s)": round(sum(a.get("seconds") or 0 for a in attempts), 1),
    }
