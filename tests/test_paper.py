"""experiments.paper.tables: tables keep reported and measured numbers apart; figures are written; the `tables`
command. No network, no GPU."""

import csv
import io
import json
import math
import re
from pathlib import Path

import pytest

from experiments.paper import tables as paper
from sidlib.metrics import protocol as FP

ROOT = Path(__file__).resolve().parents[1]


def fake_result(benchmark, fids, *, method="SiD", alpha=1.2, nfe=1, num_images=50_000, network="x.pkl", isc=None,
                pr=None):
    """A metrics JSON as sidlib.metrics.protocol writes it (summary built by its own summarise_trials)."""
    names = FP.metric_names(num_images)
    trials = []
    for i, f in enumerate(fids):
        t = {"trial": i, names["fid"]: f}
        if isc is not None:
            t[names["is"]] = isc[i]
        if pr is not None:
            t[f"{names['pr']}_precision"], t[f"{names['pr']}_recall"] = pr[i]
        trials.append(t)
    return {"format": FP.FORMAT, "benchmark": benchmark, "method": method, "alpha": alpha, "nfe": nfe,
            "network": network, "protocol": {"name": names["fid"], "proxy": names["proxy"], "num_images": num_images},
            "trials": trials, "summary": FP.summarise_trials(trials, names)}


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def numbers(text):
    out = set()
    for cell in text:
        try:
            out.add(round(float(cell), 9))
        except (TypeError, ValueError):
            pass
    return out


MEASURED_COLS = [c for c in paper.CSV_COLUMNS if c.startswith("measured_") and c not in
                 ("measured_what", "measured_protocol", "measured_file", "measured_proxy")]


def rows_of(number, reported, measurements):
    return list(csv.DictReader(io.StringIO(paper.table_csv(number, paper.build_table(number, reported,
                                                                                       measurements)))))


def test_reported_csv_loads_with_sources():
    rows = paper.load_reported()
    sid = {r["benchmark"]: r["fid"] for r in rows if r["method"] == "SiD"}
    assert set(sid) == {"cifar10-uncond", "cifar10-cond", "imagenet64-cond", "ffhq64", "afhqv2-64"}
    assert all(r["source"] and r["confidence"] for r in rows)


def test_without_measurements_every_row_is_not_run_here_and_measured_columns_are_empty():
    reported = paper.load_reported()
    for n, spec in paper.TABLES.items():
        rows = rows_of(n, reported, [])
        assert len(rows) == sum(r["benchmark"] in spec["benchmarks"] for r in reported)
        for row in rows:
            assert row["status"] == paper.NOT_RUN
            assert all(row[c] == "" for c in MEASURED_COLS + ["measured_what"])
        md = paper.table_markdown(n, paper.build_table(n, reported, []))
        assert md.count(paper.NOT_RUN) >= len(rows)


def test_measurements_fill_only_their_row_and_never_take_reported_numbers(tmp_path):
    reported = paper.load_reported()
    for name, result in (
            ("sid.json", fake_result("cifar10-uncond", [2.11, 2.05, 2.2], isc=[9.8, 9.9, 9.7],
                                     network="sid-cifar10-uncond-alpha1.2")),
            ("teacher.json", fake_result("cifar10-uncond", [2.3], method="EDM teacher", alpha=None, nfe=35,
                                         network="edm-cifar10-32x32-uncond-vp")),
            ("alpha1.json", fake_result("cifar10-uncond", [2.4, 2.5], alpha=1.0)),
            ("imnet.json", fake_result("imagenet64-cond", [1.6], pr=[(0.74, 0.63)]))):
        write(tmp_path, name, result)
    meas = paper.load_measurements([str(tmp_path / "*.json")])
    assert len(meas) == 4
    rows = rows_of(1, reported, meas)
    sid = [r for r in rows if r["method"] == "SiD" and r["alpha"] == "1.2"]
    assert len(sid) == 1
    assert float(sid[0]["reported_fid"]) == 1.923
    assert float(sid[0]["measured_fid_mean"]) == pytest.approx((2.11 + 2.05 + 2.2) / 3)
    assert float(sid[0]["measured_fid_min_of_3"]) == 2.05 and float(sid[0]["measured_is_mean"]) == pytest.approx(9.8)
    assert sid[0]["measured_what"].startswith("released checkpoint")
    teacher = [r for r in rows if r["method"].startswith("EDM teacher")]
    assert len(teacher) == 1 and float(teacher[0]["measured_fid_mean"]) == 2.3 and teacher[0]["reported_fid"] == "1.97"
    extra = [r for r in rows if r["alpha"] == "1.0"]
    assert len(extra) == 1 and extra[0]["reported_fid"] == "" and extra[0]["status"] == "measured"
    for r in rows:
        if r["status"] == paper.NOT_RUN:
            assert all(r[c] == "" for c in MEASURED_COLS)
    # Every number in a measured column comes from the JSON files; none is a reported value that was not measured.
    measured_values = numbers(r[c] for r in rows for c in MEASURED_COLS)
    json_values = set()
    for m in meas:
        json_values |= numbers(v for k, v in m.items() if k not in ("alpha", "nfe"))
    assert measured_values <= json_values
    reported_values = numbers(r["reported_fid"] for r in rows)
    assert not (measured_values & reported_values)
    t3 = rows_of(3, reported, meas)
    sid3 = [r for r in t3 if r["method"] == "SiD"][0]
    assert float(sid3["measured_precision"]) == 0.74 and float(sid3["measured_recall"]) == 0.63


def test_proxy_measurements_are_labelled_proxy(tmp_path):
    f = write(tmp_path, "p.json", fake_result("ffhq64", [3.1], num_images=10_000))
    meas = paper.load_measurements([f])
    rows = paper.build_table(4, paper.load_reported(), meas)
    md = paper.table_markdown(4, rows)
    assert "PROXY" in md and "fid10k_proxy" == meas[0]["protocol"]
    row = [r for r in rows_of(4, paper.load_reported(), meas) if r["measured_fid_mean"]][0]
    assert row["status"] == "measured (proxy)" and row["measured_proxy"] == "True"


def test_unrelated_or_incomplete_json_is_skipped(tmp_path):
    write(tmp_path, "other.json", {"fid": 1.0})
    no_bench = fake_result("cifar10-cond", [1.8])
    no_bench.pop("benchmark")
    write(tmp_path, "nobench.json", no_bench)
    with pytest.warns(UserWarning, match="benchmark"):
        assert paper.load_measurements([tmp_path]) == []


def test_write_tables_produces_markdown_and_csv(tmp_path):
    (tmp_path / "in").mkdir()
    f = write(tmp_path / "in", "a.json", fake_result("afhqv2-64", [1.7], alpha=1.0))
    paths = paper.write_tables(tmp_path / "out", paper.load_measurements([f]))
    names = {p.name for p in paths}
    assert {"table1.md", "table4.csv", "tables.md"} <= names
    text = (tmp_path / "out" / "table4.md").read_text()
    assert "1.628" in text and "1.700 (1×50k)" in text


def test_training_curve_and_figures(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # Records as sidlib.distill's loop writes them: every tick, metrics at snapshots only.
    recs = [{"tick": t, "iteration": n // 512, "images_seen": n, "kimg": n / 1000, **({"metrics": m} if m else {})}
            for t, (n, m) in enumerate([(0, {"fid10k_proxy": 80.0}), (5120, None), (10240, {"fid10k_proxy": 20.0}),
                                        (20480, {"fid10k_proxy": 9.5})])]
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (run / "config.json").write_text(json.dumps({"alpha": 1.2}))
    c = paper.load_training_curve(run)
    assert c["images"] == [0, 10240, 20480] and c["fid"] == [80.0, 20.0, 9.5] and c["metric"] == "fid10k_proxy"
    assert c["alpha"] == 1.2
    lines = paper.teacher_reference_lines("cifar10-uncond")
    assert lines == {"EDM teacher, 35 NFE (reported)": 1.97}
    png = paper.plot_fid_vs_images({"SiD α=1.2": (c["images"], c["fid"])}, lines, title="t", out=tmp_path / "f.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png2 = paper.plot_alpha_comparison({"toy": {0.5: 3.0, 1.0: 2.0, 1.2: 1.9}}, out=tmp_path / "a.png")
    assert png2.stat().st_size > 1000
    assert math.isfinite(sum(c["fid"]))


def test_tables_command_writes_the_four_tables(tmp_path, capsys):
    from experiments.paper.__main__ import main

    (tmp_path / "m").mkdir()
    write(tmp_path / "m", "sid.json", fake_result("cifar10-cond", [1.9, 1.8], network="sid-cifar10-cond-alpha1.2"))
    assert main(["tables", "--metrics", str(tmp_path / "m"), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out.split()
    assert {Path(p).name for p in printed} == {f"table{n}.{e}" for n in range(1, 5) for e in ("md", "csv")} | {
        "tables.md"}
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "table2.csv").read_text())))
    sid = [r for r in rows if r["method"] == "SiD"]
    assert len(sid) == 1 and float(sid[0]["measured_fid_mean"]) == pytest.approx(1.85)
    assert float(sid[0]["reported_fid"]) == 1.71


def test_every_reported_number_is_the_reported_csv_and_its_sources_are_documented():
    # The CSV the tables read is the one the data README documents, next to it.
    assert paper.REPORTED_CSV.is_file() and (paper.REPORTED_CSV.parent / "README.md").is_file()
    assert paper.REPORTED_CSV.name in (paper.REPORTED_CSV.parent / "README.md").read_text()


def test_the_table_footnote_cites_a_file_that_exists():
    md = paper.table_markdown(1, paper.build_table(1, paper.load_reported(), []))
    cited = [c for c in re.findall(r"`([^`]+\.csv)`", md)]
    assert cited and all((ROOT / c).is_file() for c in cited), cited


def test_captions_state_the_protocol_of_every_measured_row(tmp_path):
    res = fake_result("cifar10-uncond", [2.1, 2.2], network="runs/paper/cifar10-uncond")
    res["snapshot"] = {"snapshot": "best", "kimg": 1200, "of": 40, "criterion": "lowest fid10k_proxy of 40 logged "
                       "evaluations"}
    res["protocol"]["labels"] = None
    proxy = fake_result("cifar10-uncond", [3.0], method="EDM teacher", alpha=None, nfe=35, num_images=10_000)
    meas = paper.load_measurements([write(tmp_path, "a.json", res), write(tmp_path, "b.json", proxy)])
    md = paper.table_markdown(1, paper.build_table(1, paper.load_reported(), meas))
    caption = md.split("Protocol of each measured row:")[1]
    assert "2 trials × 50,000 images; paper protocol; snapshot 1200 kimg of 40, selected by lowest fid10k_proxy" \
        in caption
    assert "1 trial × 10,000 images; PROXY; no snapshot selection" in caption
    assert "10 trials of 50,000 images" in md  # the paper protocol, stated in every table
    row = [r for r in rows_of(1, paper.load_reported(), meas) if r["measured_fid_mean"] and r["method"] == "SiD"][0]
    assert row["measured_selection"].startswith("snapshot 1200 kimg")
    assert "Protocol of each measured row" not in paper.table_markdown(1, paper.build_table(1, paper.load_reported(),
                                                                                              []))


def test_slurm_example_passes_valid_rendezvous_arguments_to_torchrun(tmp_path):
    """paper/slurm_example.sh with stand-ins for scontrol and srun: the config it exports is valid, and the torchrun
    command lines it starts on each node parse with torchrun's own parser (2 nodes, one process per GPU, c10d)."""
    import os
    import shlex
    import stat
    import subprocess
    import sys

    import yaml
    from torch.distributed.run import get_args_parser

    from sidlib.distill import DistillConfig

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {"scontrol": "printf 'node-a\\nnode-b\\n'", "srun": f"{{ printf '%q ' \"$@\"; echo; }} >> {tmp_path / 'srun.log'}",
             "python": f"exec {sys.executable} \"$@\""}
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2",
           "SLURM_JOB_ID": "4242"}
    proc = subprocess.run(["bash", str(ROOT / "paper" / "slurm_example.sh"), "ffhq64"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cfg = DistillConfig.from_dict(yaml.safe_load((tmp_path / "runs/paper/ffhq64/config.yaml").read_text()))
    cfg.validate(world_size=8)
    lines = (tmp_path / "srun.log").read_text().splitlines()
    assert len(lines) == 2
    for line, module in zip(lines, ("sidlib.distill", "experiments.paper")):
        words = shlex.split(line)
        args = get_args_parser().parse_args(shlex.split(words[words.index("-c") + 1])[1:])
        assert (args.nnodes, args.nproc_per_node, args.rdzv_backend) == ("2", "gpu", "c10d")
        assert args.rdzv_endpoint == "node-a:29500" and args.rdzv_id == "4242"
        assert args.module and args.training_script == module
