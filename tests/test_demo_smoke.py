"""The whole chain at toy sizes: shards -> BPE -> VQ-GAN -> tokenize -> train -> export ->
generate (all three modes) -> eval. Slow-ish (one DeepSpeed run) but it is the test that keeps
every joint of the pipeline connected."""

import json

import pytest

from interleaf.cli import main

TINY = [
    "train_documents=48",
    "train_pairs=24",
    "val_documents=12",
    "progress=false",
    "vqgan=[steps=6, batch_size=4, log_every=2, save_every=3, data.val_images=8]",
    "train=[steps=4, global_batch=2, micro_batch=1, log_every=1, eval_every=0, save_every=2, data.seq_len=160, "
    "data.shuffle_buffer=8, model_size=debug, model.max_seq_len=256]",
    "eval.n_draw=2",
    "eval.n_caption=2",
    "eval.n_loss=2",
    "eval.n_story=2",
    "eval.batch_size=2",
    "eval.cfg_scales=[2.0]",
    "cfg_scale=1.5",
    "image_temperature=0.8",
]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--run-dir", str(run), *TINY]) == 0
    return run


def test_every_stage_finished_and_outputs_exist(demo_run):
    for stage in ("shards", "bpe", "vqgan", "tokenizer", "tokens", "train", "export", "samples", "eval"):
        assert (demo_run / stage / "DONE").is_file(), stage
    summary = json.loads((demo_run / "summary.json").read_text())
    assert len(summary["samples"]) == 3
    for name in ("draw", "caption", "interleaved"):
        assert (demo_run / "samples" / name / "document.md").is_file()
        assert (demo_run / "samples" / name / "document.html").is_file()
    assert list((demo_run / "samples" / "draw").glob("*.png")), "the drawing request produced no image"
    report = json.loads((demo_run / "eval" / "eval.json").read_text())
    for key in ("colour", "shape", "exact"):
        assert 0.0 <= report["text_to_image"][0][key] <= 1.0
        assert 0.0 <= report["image_to_text"][key] <= 1.0
    assert report["loss"]["text_tokens"] > 0 and report["loss"]["image_tokens"] > 0
    assert report["vqgan"]["psnr"] > 0
    assert report["story"]["n"] == 2 and 0.0 <= report["story"]["exact"] <= 1.0 and "copied" in report["story"]
    # the exported model draws by default as the demo's samples did
    from interleaf.pipeline import read_sampling_defaults

    assert read_sampling_defaults(demo_run / "export" / "model") == {"cfg_scale": 1.5, "image_temperature": 0.8}


def test_rerun_reuses_finished_stages(demo_run, capsys):
    assert main(["demo", "--run-dir", str(demo_run), *TINY]) == 0
    out = capsys.readouterr().out
    assert out.count("done earlier") == 9


def test_eval_command_writes_report(demo_run, tmp_path, capsys):
    out = tmp_path / "r.json"
    model = demo_run / "export" / "model"
    assert (
        main(
            [
                "eval",
                str(model),
                "n_draw=1",
                "n_caption=1",
                "n_loss=1",
                "n_story=1",
                "cfg_scales=[1.0]",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["model_dir"] == str(model)
    assert "text->image" in capsys.readouterr().out


def test_eval_bad_input_is_one_line_error_before_any_work(demo_run, tmp_path, capsys, monkeypatch):
    import interleaf

    model = demo_run / "export" / "model"
    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(interleaf, "load", lambda *a, **k: pytest.fail("loaded the model before checking the input"))

    def refused(argv, message):
        assert main(["eval", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err

    refused([str(model), "cfg_scales=[inf]"], "cfg_scale must be a number in [0, 1000], got inf")
    refused([str(model), "image_temperature=1e39"], "image_temperature must be a number in")
    refused([str(model), "--out", str(tmp_path)], "is a folder, not a file")
    refused([str(model), "--out", str(tmp_path / "afile" / "r.json")], "is a file, not a folder")
    monkeypatch.undo()
    refused([str(tmp_path / "missing")], "model directory not found")
