"""The dataset runner: shards equal a one-batch explanation, torchrun ranks equal one process bit
for bit (float64), a killed run resumes with no duplicates or gaps, image folders, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors")

import lrpgraph  # noqa: E402
from lrpgraph import cli, zoo  # noqa: E402
from lrpgraph.dataset import DatasetError, explain_dataset, load_shards, read_manifest  # noqa: E402
from lrpgraph.dataset_cli import ImageFolder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--model", "vgg", "--batch-size", "4", "--shard-size", "4", "--double", "--dtype", "float64", "--quiet"]


def _env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


@pytest.fixture(autouse=True)
def _one_thread():
    """In-process runs use one thread, as the subprocesses here do (OMP_NUM_THREADS=1): another
    thread count changes the last bits of BLAS sums, and these tests compare runs bit for bit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_api_shards_match_explainer(tmp_path):
    """Any Dataset in; the shards hold what the Explainer gives for the same batches."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).eval()
    x = torch.randn(7, 6)
    m = explain_dataset(model, torch.utils.data.TensorDataset(x), out=tmp_path, batch_size=2,
                        shard_size=3, targets=1, relevance_dtype="float16", progress=False)
    assert m["complete"] and [(s["start"], s["stop"]) for s in m["shards"]] == [(0, 3), (3, 6), (6, 7)]
    t = load_shards(tmp_path)
    assert t["index"].tolist() == list(range(7)) and t["target"].tolist() == [1] * 7
    assert t["relevance"].dtype == torch.float16 and t["relevance"].shape == (7, 6)
    ex = lrpgraph.Explainer(model)
    batches = [(0, 2), (2, 3), (3, 5), (5, 6), (6, 7)]      # never across a shard: [0,1] [2] | [3,4] [5] | [6]
    ref = torch.cat([ex(x[lo:hi], target=1).relevance for lo, hi in batches])
    assert torch.equal(t["relevance"], ref.half())
    assert torch.allclose(t["relevance_sum"], ref.double().sum(1), atol=1e-6)
    # the per-sample summary is the report's worst relative error for that sample (here the
    # positive stream dies at the dead ReLUs of some samples: the report names that a loss, not a leak)
    reps = [ex(x[i:i + 1], target=1).conservation() for i in range(7)]
    per = torch.tensor([rep.max_rel_error() for rep in reps], dtype=torch.float64)
    assert torch.allclose(t["rel_error"], per, atol=1e-6) and float(per.max()) < 1e-5
    assert any(rep.losses() for rep in reps)
    part = load_shards(tmp_path, indices=[5, 1])
    assert part["index"].tolist() == [5, 1]
    csv = (tmp_path / "conservation.csv").read_text().splitlines()
    assert csv[0].startswith("index,target,predicted") and len(csv) == 8
    # a map that float16 cannot hold is refused, not stored as inf
    big = torch.nn.Linear(2, 2).eval()
    with torch.no_grad():
        big.weight.fill_(1e6)
    with pytest.raises(DatasetError, match="not finite as float16; store float32"):
        explain_dataset(big, torch.utils.data.TensorDataset(torch.ones(2, 2)), rules="lrp-0", out=tmp_path / "big",
                        contrastive=False, relevance_dtype="float16", progress=False)


def test_torchrun_two_ranks_equal_one_process(tmp_path):
    """torchrun --standalone --nproc_per_node 2 over 10 bundled samples: the merged shards equal a
    one-process run bit for bit in float64; each rank wrote its own shards (k % 2)."""
    multi, single = tmp_path / "multi", tmp_path / "single"
    # --standalone: a free port, so this cannot collide with the documented torchrun block when
    # the suite runs on several workers (pytest -n)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lrpgraph",
           "dataset", "--num-samples", "10", "--out", str(multi), *ARGS]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    # the one-process run in a subprocess with the same environment (one thread, as the ranks have:
    # another thread count changes the last bits of the BLAS sums)
    r = subprocess.run([sys.executable, "-m", "lrpgraph", "dataset", "--n", "10", "--out", str(single), *ARGS],
                       env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_shards(multi), load_shards(single)
    _same(a, b)
    assert a["index"].tolist() == list(range(10)) and a["relevance"].dtype == torch.float64
    m = read_manifest(multi)
    assert m["complete"] and len(m["shards"]) == 3 and m["config"] == read_manifest(single)["config"]


def test_killed_run_resumes_without_duplicates_or_gaps(tmp_path, capsys):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lrpgraph", "dataset", "--n", "10", "--out", str(out), *ARGS]
    r = subprocess.run(cmd, env=_env(LRPGRAPH_DATASET_FAIL_AFTER="1"), capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 3, r.stderr[-3000:]               # died after the first shard
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.safetensors"]
    assert (out / ".shard-00001.safetensors.tmp").exists()    # a half-written file, as a kill leaves
    assert not read_manifest(out)["complete"]
    with pytest.raises(DatasetError, match="not finished"):
        load_shards(out)
    first = (out / "shard-00000.safetensors").stat().st_mtime_ns
    assert cli.main(["dataset", "--n", "10", "--out", str(out), *ARGS]) == 0
    assert "1 finished shard(s) skipped" in capsys.readouterr().err
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == first   # not rewritten
    assert not list(out.glob(".*tmp*"))
    t = load_shards(out)
    assert t["index"].tolist() == list(range(10))
    ref = tmp_path / "ref"
    assert cli.main(["dataset", "--n", "10", "--out", str(ref), *ARGS]) == 0
    _same(t, load_shards(ref))
    # a finished run: a rerun writes nothing
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    assert cli.main(["dataset", "--n", "10", "--out", str(out), *ARGS]) == 0
    assert "3 finished shard(s) skipped" in capsys.readouterr().err
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}


def test_image_folder(tmp_path):
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    for cls, sizes in (("cat", [(32, 32), (48, 40)]), ("dog", [(20, 64)])):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "img" / cls / f"{i}.png")
    (tmp_path / "img" / "notes.txt").write_text("not an image")
    data = ImageFolder(str(tmp_path / "img"), 32, zoo.MEAN, zoo.STD)
    assert len(data) == 3 and data.classes == ["cat", "dog"]
    x0, y0 = data[0]
    raw = torch.from_numpy(np.asarray(Image.open(tmp_path / "img" / "cat" / "0.png"), dtype=np.float32)).permute(2, 0, 1)
    mean, std = torch.tensor(zoo.MEAN).view(3, 1, 1), torch.tensor(zoo.STD).view(3, 1, 1)
    assert torch.allclose(x0, (raw / 255 - mean) / std) and int(y0) == 0       # 32x32: no resize
    assert data[1][0].shape == data[2][0].shape == (3, 32, 32) and int(data[2][1]) == 1
    out = tmp_path / "out"
    assert cli.main(["dataset", "--model", "vgg", "--data", str(tmp_path / "img"), "--targets", "label",
                     "--out", str(out), "--quiet"]) == 0
    t = load_shards(out)
    assert t["target"].tolist() == [0, 0, 1] and t["relevance"].shape == (3, 3, 32, 32)


def _one_line_error(capsys, argv, needle):
    assert cli.main(["dataset", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and needle in err, err


def test_errors_refuse_before_work(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    _one_line_error(capsys, ["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "--data")
    _one_line_error(capsys, ["--out", str(f)], "not a folder")
    _one_line_error(capsys, ["--out", str(f / "sub")], "cannot write")
    _one_line_error(capsys, ["--model", "alexnet", "--out", str(tmp_path / "o")], "--model")
    _one_line_error(capsys, ["--rules", "lrp-9", "--out", str(tmp_path / "o")], "--rules")
    _one_line_error(capsys, ["--n", "0", "--out", str(tmp_path / "o")], "--n must be")
    _one_line_error(capsys, ["--n", "513", "--out", str(tmp_path / "o")], "has 512 samples")
    _one_line_error(capsys, ["--data", str(tmp_path), "--out", str(tmp_path / "o")], "no images")
    assert not (tmp_path / "o").exists()
    # resume with other arguments: refused, nothing touched
    out = tmp_path / "run"
    assert cli.main(["dataset", "--n", "4", "--out", str(out), "--quiet"]) == 0
    before = (out / "manifest.json").read_text()
    capsys.readouterr()
    _one_line_error(capsys, ["--n", "4", "--out", str(out), "--rules", "lrp-epsilon"], "another configuration")
    _one_line_error(capsys, ["--n", "4", "--out", str(out), "--dtype", "float16"], "relevance_dtype")
    assert (out / "manifest.json").read_text() == before
    # shards with no manifest
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "shard-00000.safetensors").write_bytes(b"")
    _one_line_error(capsys, ["--n", "4", "--out", str(stray)], "no manifest.json")
    # a changed shard is caught by its checksum
    with open(out / "shard-00000.safetensors", "r+b") as fh:
        fh.seek(-1, 2)
        fh.write(b"\x00" if fh.read(1) != b"\x00" else b"\x01")
    with pytest.raises(DatasetError, match="checksum"):
        load_shards(out)
    assert json.loads(before)["complete"]


def test_evaluate_reads_precomputed_maps(tmp_path, capsys):
    """`lrpgraph evaluate --attributions DIR` scores the stored maps: the same ABPC per sample as
    computing them; maps for other classes, GAE, or a missing run are refused."""
    from lrpgraph.evaluate.cli import main as evaluate

    run = tmp_path / "run"
    assert cli.main(["dataset", "--model", "vgg", "--n", "8", "--out", str(run), "--quiet"]) == 0
    common = ["--n", "8", "--abpc-steps", "4", "--no-plot", "--quiet"]
    assert evaluate(["--attributions", str(run), "--out", str(tmp_path / "a"), *common]) == 0
    assert evaluate(["--models", "vgg", "--methods", "abslrp", "--metrics", "abpc", "--out", str(tmp_path / "b"), *common]) == 0
    a = torch.load(tmp_path / "a" / "evaluation_samples.pt")["vgg"]["abslrp (precomputed)"]["abpc"]
    b = torch.load(tmp_path / "b" / "evaluation_samples.pt")["vgg"]["abslrp"]["abpc"]
    assert a.shape == (8,) and torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    capsys.readouterr()
    assert evaluate(["--attributions", str(run), "--metrics", "gae", "--out", str(tmp_path / "c"), *common]) == 2
    err = capsys.readouterr().err
    assert "use --metrics abpc" in err and "\n" not in err.strip()
    assert evaluate(["--attributions", str(tmp_path), "--out", str(tmp_path / "c"), *common]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    other = tmp_path / "other"
    assert cli.main(["dataset", "--model", "vgg", "--n", "8", "--targets", "0", "--out", str(other), "--quiet"]) == 0
    assert evaluate(["--attributions", str(other), "--out", str(tmp_path / "d"), *common]) == 0
    assert "explains class 0, not class 9" in (tmp_path / "d" / "evaluation.md").read_text()
