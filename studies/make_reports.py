"""Rebuild every study's report from its committed raw data (CPU only; ``make reports``).

    python studies/make_reports.py                      # rewrite the committed reports in place
    python studies/make_reports.py --out-dir /tmp/r     # write them under /tmp/r/<study>/ instead
    python studies/make_reports.py --only decoder,engine_sync

Each report maker is run as its own process, as a user would run it. A report whose simulated side needs
the shared real trace (never copied into the repository) is rebuilt in full when the trace is at
``../shared/traces/real/``; without it, its maker re-renders the ``.md`` (and ``.png``) from the committed
``.json``, which holds every number the prose prints. ``tests/test_reports_rebuild.py`` runs this into a
temporary folder and compares the result with the committed files byte for byte.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studies._common import REAL_TRACE, ROOT  # noqa: E402


@dataclass(frozen=True)
class Report:
    """One report: its study folder, the files it writes there, and the maker's command line given the
    folder to write into (``full``: rebuilt from raw data; ``render``: re-rendered from the committed json)."""
    name: str
    study: str
    outputs: tuple[str, ...]
    full: Callable[[Path], list[str]]
    render: Callable[[Path], list[str]] | None = None   # set where the full rebuild needs the real trace

    def command(self, out: Path, real: Path) -> list[str]:
        if self.render is None:
            return self.full(out)
        return self.full(out) + ["--real", str(real)] if real.exists() else self.render(out)


def _maker(study: str, script: str = "make_report.py") -> str:
    return f"studies/{study}/{script}"


REPORTS: tuple[Report, ...] = (
    Report("engine_sync", "engine_sync", ("engine_sync_h200.md",),
           lambda o: [_maker("engine_sync"), "-o", str(o / "engine_sync_h200.md")]),
    Report("decoder", "decoder", ("decoder_h200.json", "decoder_h200.md"),
           lambda o: [_maker("decoder"), "-o", str(o / "decoder_h200")]),
    Report("learned_routing", "learned_routing",
           ("learned_routing_h200.json", "learned_routing_h200.md", "learned_routing_h200.png"),
           lambda o: [_maker("learned_routing"), "-o", str(o / "learned_routing_h200")]),
    Report("learned_routing_speedup", "learned_routing", ("learned_routing_speedup.json", "learned_routing_speedup.md"),
           lambda o: [_maker("learned_routing", "run_speedup.py"), "-o", str(o / "learned_routing_speedup")]),
    Report("learned_training", "learned_routing", ("learned_moe_training.png",),
           lambda o: [_maker("learned_routing", "plot_training.py"), "-o", str(o / "learned_moe_training.png")]),
    Report("fidelity", "fidelity", ("fidelity_h200.json", "fidelity_h200.md", "fidelity_h200.png"),
           lambda o: [_maker("fidelity"), "-o", str(o / "fidelity_h200")],
           lambda o: [_maker("fidelity"), "--from-json", "studies/fidelity/fidelity_h200.json",
                      "-o", str(o / "fidelity_h200")]),
    Report("sim_vs_real", "fidelity", ("sim_vs_real_h200.json", "sim_vs_real_h200.md", "sim_vs_real_h200.png"),
           lambda o: [_maker("fidelity", "make_sim_vs_real_report.py"), "-o", str(o / "sim_vs_real_h200")],
           lambda o: [_maker("fidelity", "make_sim_vs_real_report.py"), "--from-json",
                      "studies/fidelity/sim_vs_real_h200.json", "-o", str(o / "sim_vs_real_h200")]),
    Report("miss_cost", "miss_cost", ("miss_cost_h200.json", "miss_cost_h200.md", "miss_cost_h200.png"),
           lambda o: [_maker("miss_cost"), "-o", str(o / "miss_cost_h200")],
           lambda o: [_maker("miss_cost"), "--from-json", "studies/miss_cost/miss_cost_h200.json",
                      "-o", str(o / "miss_cost_h200")]),
    Report("residency_proof", "residency_proof", ("residency_proof_h200.md",),
           lambda o: [_maker("residency_proof"), "-o", str(o / "residency_proof_h200.md")]),
    Report("recorder_overhead", "recorder_overhead", ("recorder_overhead_h200_mixtral8x7b.md",),
           lambda o: [_maker("recorder_overhead"), "-o", str(o / "recorder_overhead_h200_mixtral8x7b.md")]),
    Report("seed_reproduction", "seed_reproduction", ("seed_reproduction.json", "seed_reproduction.md"),
           lambda o: [_maker("seed_reproduction"), "-o", str(o / "seed_reproduction")],
           lambda o: [_maker("seed_reproduction"), "--from-json", "studies/seed_reproduction/seed_reproduction.json",
                      "-o", str(o / "seed_reproduction")]),
    Report("mixtral_offloading_comparison", "mixtral_offloading_comparison",
           ("mixtral_offloading_comparison.json", "mixtral_offloading_comparison.md"),
           lambda o: [_maker("mixtral_offloading_comparison"), "-o", str(o / "mixtral_offloading_comparison")],
           lambda o: [_maker("mixtral_offloading_comparison"), "--from-json",
                      "studies/mixtral_offloading_comparison/mixtral_offloading_comparison.json",
                      "-o", str(o / "mixtral_offloading_comparison")]),
    Report("budgets", "budgets", ("budgets.md",),
           lambda o: [_maker("budgets"), "-o", str(o / "budgets.md")]),
    Report("bound", "bound", ("bound.md",),
           lambda o: [_maker("bound"), "-o", str(o / "bound.md")]),
    Report("checkpoint_load", "checkpoint_load", ("report.md",),
           lambda o: [_maker("checkpoint_load"), "-o", str(o / "report.md")]),
    Report("hybrid", "hybrid", ("report.md",),
           lambda o: [_maker("hybrid"), "-o", str(o / "report.md")]),
    Report("roofline", "roofline", ("report.md",),
           lambda o: [_maker("roofline"), "-o", str(o / "report.md")]),
    Report("roofline_pieces_v2", "roofline", ("pieces_v2.md",),
           lambda o: [_maker("roofline"), "studies/roofline/raw/pieces_v2_h100.json", "-o", str(o / "pieces_v2.md")]),
    Report("roofline_check", "roofline", ("h100_fused.json", "fast_engine_check.json", "fast_engine_check.md"),
           lambda o: [_maker("roofline", "fast_engine_check.py"), "-o", str(o / "fast_engine_check")]),
    Report("roofline_whatif", "roofline", ("whatif.json", "whatif.md", "whatif.png"),
           lambda o: [_maker("roofline", "whatif.py"), "-o", str(o / "whatif")]),
    Report("record_offload", "record_offload", ("report.md",),
           lambda o: [_maker("record_offload"), "-o", str(o / "report.md")]),
    Report("hybrid_published", "hybrid_published", ("hybrid_published.json", "hybrid_published.md"),
           lambda o: [_maker("hybrid_published"), "-o", str(o / "hybrid_published")],
           lambda o: [_maker("hybrid_published"), "--from-json", "studies/hybrid_published/hybrid_published.json",
                      "-o", str(o / "hybrid_published")]),
    Report("formats", "formats", ("report.md",),
           lambda o: [_maker("formats"), "-o", str(o / "report.md")]),
    Report("nvme", "nvme", ("nvme.md",),
           lambda o: [_maker("nvme"), "-o", str(o / "nvme.md")]),
)


def run(reports: list[Report], out_dir: Path | None, real: Path) -> int:
    """Run each report's maker; returns the number that failed (each failure is reported on stderr)."""
    failed = 0
    for i, rep in enumerate(reports, 1):
        dest = (out_dir / rep.study) if out_dir is not None else ROOT / "studies" / rep.study
        dest.mkdir(parents=True, exist_ok=True)
        cmd = rep.command(dest, real)
        mode = "render from json" if rep.render is not None and not real.exists() else "full"
        print(f"[{i}/{len(reports)}] {rep.name} ({mode}): {' '.join(cmd)}", flush=True)
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            failed += 1
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"make_reports: {rep.name}: {cmd[0]} exited {proc.returncode}: {tail}", file=sys.stderr)
    return failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, help="write under DIR/<study>/ instead of over the committed reports")
    ap.add_argument("--only", help="comma-separated report names (default: all): " + ", ".join(r.name for r in REPORTS))
    ap.add_argument("--real", type=Path, default=REAL_TRACE, help="the shared real trace, when present")
    args = ap.parse_args(argv)
    chosen = list(REPORTS)
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {r.name for r in REPORTS})
        if unknown:
            print(f"make_reports: unknown report(s) {', '.join(unknown)}; known: "
                  f"{', '.join(r.name for r in REPORTS)}", file=sys.stderr)
            return 2
        chosen = [r for r in REPORTS if r.name in names]
    failed = run(chosen, args.out_dir, args.real)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
