"""Entry point kept at this path for outside checks (CONTRACTS.md section 1): runs the fidelity study's
driver, studies/fidelity/gpu_validate.py, with the same flags and outputs."""
import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "studies" / "fidelity" / "gpu_validate.py"),
                   run_name="__main__")
