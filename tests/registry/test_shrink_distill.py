"""Distillation on a tiny BERT built here: a smaller student that exports, learns the teacher, resumes after an
interruption exactly where it stopped, and is cancelled promptly; bad inputs give clear ShrinkErrors."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.registry.shrink import (
    Cancelled,
    ShrinkError,
    distill,
    finetune,
    parse_student,
    prune,
    read_labeled,
    read_texts,
)
from tests.registry.shrink_models import context, sentences, tiny_bert
from wire.manifest import Task

torch = pytest.importorskip("torch")

TEXTS = [t for t, _ in sentences(200)]
#: a shallower student with a narrower FFN (random there), so the untrained student is far from the teacher
NARROW = "layers=2,ffn=32"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("teacher") / "ckpt")


def test_distilled_student_is_smaller_exports_and_learns_the_teacher(teacher: Path, tmp_path: Path) -> None:
    from controller.registry.convert import export_hf

    ctx, seen = context(tmp_path / "work")
    report = distill(teacher, tmp_path / "out", ctx, texts=TEXTS, student=NARROW, epochs=6, lr=2e-3, held_out=0.2)
    assert report.params_after < report.params_before / 2
    assert report.held_out == 40 and report.examples == 160
    # trained, the student is much closer to the teacher than the same student untrained (random-weight vectors
    # all point roughly the same way, so the distance 1 - cosine is what tells)
    q = report.quality
    assert 1 - q["cosine_mean"] < (1 - q["untrained_cosine_mean"]) / 4, q
    assert seen[-1] == 1.0 and seen == sorted(seen)
    assert any("start random" in n for n in report.notes)
    bundle = export_hf(tmp_path / "out", Task.EMBEDDINGS, tmp_path / "onnx")
    teacher_bundle = export_hf(teacher, Task.EMBEDDINGS, tmp_path / "onnx-teacher")
    assert bundle.size_bytes < teacher_bundle.size_bytes
    assert bundle.spec.io.outputs[0].shape[-1] == 64


def test_a_student_of_the_teachers_width_starts_from_its_layers(teacher: Path, tmp_path: Path) -> None:
    ctx, _ = context(tmp_path / "work")
    report = distill(teacher, tmp_path / "out", ctx, texts=TEXTS[:60], student="layers=2", epochs=1)
    assert report.settings["teacher_layers"] == [0, 3]
    assert report.settings["shape"] == {"layers": 2, "hidden": 64, "heads": 4, "ffn": 256}
    from transformers import BertModel

    student = BertModel.from_pretrained(tmp_path / "out", local_files_only=True)
    assert student.config.num_hidden_layers == 2


def test_an_interrupted_distillation_resumes_where_it_stopped(teacher: Path, tmp_path: Path) -> None:
    args = {"texts": TEXTS, "student": NARROW, "epochs": 3, "lr": 2e-3, "held_out": 0.2}
    ctx, _ = context(tmp_path / "work", stop_after=8)
    with pytest.raises(Cancelled):
        distill(teacher, tmp_path / "out", ctx, **args)
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "work" / "distill_state.pt").is_file()
    state = torch.load(tmp_path / "work" / "distill_state.pt", weights_only=False)
    assert state["steps"] == 8  # cancelled within one batch of the request
    ctx, _ = context(tmp_path / "work")
    resumed = distill(teacher, tmp_path / "out", ctx, **args)
    assert "resumed at optimizer step 8 of 15" in resumed.notes
    # the same result as a run never interrupted (batches are seeded, dropout is off)
    ctx, _ = context(tmp_path / "work2")
    straight = distill(teacher, tmp_path / "out2", ctx, **args)
    assert resumed.quality == pytest.approx(straight.quality, abs=1e-4)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "out2" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda t, o, c: distill(t, o, c, texts=[], student="bert-tiny"), "no texts"),
        (lambda t, o, c: distill(t, o, c, texts=TEXTS, student="bert-huge"), "unknown student shape"),
        (lambda t, o, c: distill(t, o, c, texts=TEXTS, student="layers=9"), "deeper than the teacher"),
        (lambda t, o, c: distill(t, o, c, texts=TEXTS, student="bert-tiny"), "must keep the teacher's hidden size"),
        (lambda t, o, c: prune(t, o, c, heads=1.5, ffn=0.5), "heads must be a fraction"),
        (lambda t, o, c: prune(t, o, c, heads=0, ffn=0), "nothing to prune"),
        (lambda t, o, c: finetune(t, o, c, examples=[("a", "x"), ("b", "x")]), "at least two labels"),
        (lambda t, o, c: finetune(t, o, c, examples=[]), "no labeled examples"),
    ],
)
def test_bad_requests_say_what_is_wrong(teacher: Path, tmp_path: Path, call: object, message: str) -> None:
    ctx, _ = context(tmp_path / "work")
    with pytest.raises(ShrinkError, match=message):
        call(teacher, tmp_path / "out", ctx)  # type: ignore[operator]
    assert not (tmp_path / "out").exists()


def test_shapes_and_data_files(tmp_path: Path) -> None:
    assert parse_student("bert-mini") == {"layers": 4, "hidden": 256, "heads": 4, "ffn": 1024}
    assert parse_student("layers=3, hidden=256") == {"layers": 3, "hidden": 256}
    with pytest.raises(ShrinkError, match="how many layers"):
        parse_student("hidden=128")
    (tmp_path / "t.jsonl").write_text('{"text": "one"}\n"two"\n\n')
    texts, digest = read_texts(tmp_path / "t.jsonl")
    assert texts == ["one", "two"] and len(digest) == 64
    (tmp_path / "l.jsonl").write_text('{"text": "one", "label": "a"}\n{"text": "two"}\n')
    with pytest.raises(ShrinkError, match="line 2"):
        read_labeled(tmp_path / "l.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ShrinkError, match="no texts"):
        read_texts(tmp_path / "e.jsonl")


_KILLED_RUN = """
import sys, time
from pathlib import Path
from controller.registry.shrink import StepContext, distill
from tests.registry.test_shrink_distill import NARROW, TEXTS

def slow(_fraction, _message):
    time.sleep(0.05)  # gives the test time to kill it mid-run, between saves

ctx = StepContext(work_dir=Path(sys.argv[2]), progress=slow, cancelled=lambda: False)
distill(Path(sys.argv[1]), Path(sys.argv[3]), ctx, texts=TEXTS, student=NARROW, epochs=12, lr=2e-3, held_out=0.2)
"""


def test_a_distillation_killed_mid_run_resumes_from_its_last_save(teacher: Path, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    from controller.registry.shrink.train import SAVE_EVERY
    from tests.helpers import wait_until

    work = tmp_path / "work"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_RUN, str(teacher), str(work), str(tmp_path / "out")],
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        state = work / "distill_state.pt"
        wait_until(state.is_file, timeout=120, what="the first saved state")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (tmp_path / "out").exists()
    saved = torch.load(work / "distill_state.pt", weights_only=False)["steps"]
    assert saved % SAVE_EVERY == 0 and saved < 60
    ctx, _ = context(work)
    report = distill(teacher, tmp_path / "out", ctx, texts=TEXTS, student=NARROW, epochs=12, lr=2e-3, held_out=0.2)
    assert f"resumed at optimizer step {saved} of 60" in report.notes
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out.tmp").exists()
