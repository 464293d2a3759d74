"""Running the official BIDS validator (``bids-validator-deno`` from PyPI) on a dataset."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

EXECUTABLE = "bids-validator-deno"


@dataclass
class ValidationResult:
    errors: list[dict]
    warnings: list[dict]

    def summary(self, limit: int = 5) -> str:
        parts = []
        for issue in self.errors[:limit]:
            where = issue.get("location") or ""
            parts.append(f"{issue.get('code')} {where}".strip())
        more = f" (+{len(self.errors) - limit} more)" if len(self.errors) > limit else ""
        return "; ".join(parts) + more


def validator_available() -> bool:
    return shutil.which(EXECUTABLE) is not None


def validate_dataset(path: Path | str, timeout: float = 600) -> ValidationResult:
    """Run the validator and return its errors and warnings (JSON output parsed)."""
    proc = subprocess.run(
        [EXECUTABLE, str(path), "--format", "json"],
        capture_output=True, text=True, timeout=timeout,
    )
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"bids-validator gave no JSON report: {proc.stderr.strip()[:300]}")
    issues = report.get("issues", {}).get("issues", [])
    return ValidationResult(
        errors=[i for i in issues if i.get("severity") == "error"],
        warnings=[i for i in issues if i.get("severity") == "warning"],
    )
