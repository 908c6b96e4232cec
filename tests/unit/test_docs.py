"""docs/configuration.md is generated from the config fields and must stay in sync."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_up_to_date():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_config_docs.py"),
                             "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
