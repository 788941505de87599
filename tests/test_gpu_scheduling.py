"""GPU scheduling without a GPU: a standalone cluster whose worker advertises a `gpu` resource through the
project's discovery script. The embedding stage must run with the GPU assigned (a task ResourceProfile),
the reading stage without it, and the runtime must follow the assigned address (CPU where CUDA is absent,
with the same vectors as a local run)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from deltalake import DeltaTable

from clinlong.pipelines.core.devices import MAX_GPU_ROW_TOKENS, choose_device, gpu_token_budget
from tests.cluster import project_zip, standalone_cluster
from tests.conftest import ROOT, write_test_notes
from tests.test_standalone_cluster import _submit

SCRIPT = ROOT / "pipelines" / "resources" / "get_gpus_resources.sh"


def test_device_choice_outside_tasks():
    assert choose_device("cpu") == "cpu"
    assert choose_device("auto") == "cpu"  # no task, no assigned GPU: never take one
    with pytest.raises(ValueError):
        choose_device("tpu")


def test_gpu_token_budget_scales_with_free_memory():
    small = gpu_token_budget(8 << 30, 768, 3072, 12, 256, kernel="blocks", cap=10**9)
    big = gpu_token_budget(80 << 30, 768, 3072, 12, 256, kernel="blocks", cap=10**9)
    assert 10_000 < small < big and abs(big / small - 10) < 0.1
    # The fused kernels hold no scores: the row is as long as the cap allows on a large GPU.
    assert gpu_token_budget(80 << 30, 768, 3072, 12, 256) == MAX_GPU_ROW_TOKENS
    assert gpu_token_budget(1 << 30, 768, 3072, 12, 256) < MAX_GPU_ROW_TOKENS


def test_out_of_memory_splits_the_batch_and_loses_nothing(tiny_artifact):
    """A model that fails rows packing more than two sequences: the runtime halves them and retries."""
    from clinlong.pipelines.core.artifact import Artifact
    from clinlong.pipelines.core.runtime import Encoder

    enc = Encoder(Artifact.open(tiny_artifact), batch_size=8)
    real = enc.model
    calls = []

    def flaky(ids, positions):
        calls.append(int((positions == enc.padding_idx + 1).sum()))  # sequences in the row
        if calls[-1] > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(ids, positions)

    enc.model = flaky
    seqs = [np.array([0, *range(10, 10 + n), 2]) for n in (5, 6, 7, 8, 9, 5, 6)]
    out = enc(seqs)
    assert [len(o) for o in out] == [len(s) for s in seqs] and max(calls) > 2 and calls.count(1) + calls.count(2) > 0
    enc.model = real
    np.testing.assert_allclose(np.concatenate(out), np.concatenate(enc(seqs)), atol=1e-6)


@pytest.mark.slow
def test_gpu_resource_goes_to_the_embedding_stage_only(tiny_artifact, tmp_path, monkeypatch):
    notes = write_test_notes(tmp_path / "NOTEEVENTS.csv")
    zipped = project_zip(tmp_path / "clinlong.zip")
    job = [
        str(ROOT / "pipelines" / "embed_notes.py"),
        "--notes",
        str(notes),
        "--model",
        str(tiny_artifact),
        "--id-type",
        "long",
    ]
    local = _submit("local[2]", job + ["--out", str(tmp_path / "local")], str(zipped))
    assert local.returncode == 0, local.stderr[-3000:]
    events = tmp_path / "events"
    events.mkdir()
    monkeypatch.setenv("CLINLONG_GPU_ADDRESSES", "0")  # what the worker's discovery script reports
    worker = {
        "cores": 2,
        "opts": f"-Dspark.worker.resource.gpu.amount=1 -Dspark.worker.resource.gpu.discoveryScript={SCRIPT}",
    }
    with standalone_cluster(tmp_path / "cluster", [worker]) as master:
        proc = _submit(
            master,
            job + ["--out", str(tmp_path / "gpu"), "--gpus-per-task", "1", "--device", "auto", "--partitions", "2"],
            str(zipped),
            {
                "spark.executor.cores": "2",
                "spark.cores.max": "2",
                "spark.executor.resource.gpu.amount": "1",
                "spark.dynamicAllocation.enabled": "false",
                "spark.eventLog.enabled": "true",
                "spark.eventLog.dir": str(events),
                "spark.eventLog.compress": "false",
                "spark.eventLog.rolling.enabled": "false",
            },
            cwd=tmp_path,
        )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The runtime followed the assigned address: GPU 0 was given to every embedding task; without CUDA
    # here the model ran on the CPU.
    assert re.search(r"devices: cpu \w+ x\d+; GPU addresses assigned: 0 x\d+", proc.stdout), proc.stdout
    # Spark's own record: the embedding stage (and the model preload) ran under a profile asking for a GPU
    # per task, the reading stage under the default profile (no GPU).
    log = [json.loads(line) for f in events.rglob("*") if f.is_file() for line in f.read_text().splitlines()]
    profiles = {e["Resource Profile Id"]: e for e in log if e["Event"] == "SparkListenerResourceProfileAdded"}
    gpu_profiles = {pid for pid, e in profiles.items() if "gpu" in e.get("Task Resource Requests", {})}
    stages = [e["Stage Info"] for e in log if e["Event"] == "SparkListenerStageCompleted"]
    heavy = [s for s in stages if s["Resource Profile Id"] in gpu_profiles]
    light = [s for s in stages if s["Resource Profile Id"] not in gpu_profiles]
    assert heavy and light, [(s["Stage Name"], s["Resource Profile Id"]) for s in stages]
    # the GPU stages: the embedding stage and the model preload that ran beside the reading stages
    sites = sorted(s["Stage Name"].rsplit(" at ", 1)[-1].rsplit(":", 1)[0].rsplit("/", 1)[-1] for s in heavy)
    # (the embedding stage's call site is Spark's to name: delta/writers/rs.py or spark.py, or the JDK's
    # CompletableFuture.java where Spark 4.1 submits the job from its async path; the preload's is executor.py)
    assert len(heavy) >= 2 and "executor.py" in sites, [s["Stage Name"] for s in heavy]
    a = DeltaTable(str(tmp_path / "local")).to_pandas().sort_values(["note_id", "text_sha256"])
    b = DeltaTable(str(tmp_path / "gpu")).to_pandas().sort_values(["note_id", "text_sha256"])
    for x, y in zip(a.embedding, b.embedding):
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_allclose(x, y, atol=1e-5)
