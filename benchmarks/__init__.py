from __future__ import annotations


def print_json(result: dict, out: str | None = None) -> None:
    """Print a benchmark's figures as JSON and, given ``out``, write the same text there."""
    import json
    from pathlib import Path

    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
