"""Draft training and make_demo, end to end on tiny models: the jobs run, their checkpoints load through the
engine's loaders and decode losslessly, training resumes where it stopped, and tokenizer mismatches are refused."""

import json

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from pipeline.schema import OUTPUT_SCHEMA
from specvlm.data.prompts import render
from specvlm.demo.cli import make_demo_main
from specvlm.demo.quality import content_tokens, decode_all, scene_requests, token_outcomes
from specvlm.demo.shards import write_parquet_shards
from specvlm.demo.tokenizer import build_demo_tokenizer
from specvlm.demo.world import make_scene
from specvlm.engine import DraftSettings, build_draft
from specvlm.models.build import build_text_lm, build_tokenizer
from specvlm.models.loading import ModelLoadError, load_target
from specvlm.training.cli import train_draft_main
from specvlm.training.examples import Example
from specvlm.training.loop import TrainConfig, last_step, train
from specvlm.training.outputs import OutputsError, check_tokenizer, load_images, read_outputs

TINY = [
    "--tokenizer-scenes",
    "200",
    "--vision-steps",
    "2",
    "--target-steps",
    "4",
    "--finetune-steps",
    "2",
    "--scenes-per-step",
    "2",
    "--target-hidden",
    "32",
    "--target-layers",
    "1",
    "--target-heads",
    "2",
    "--target-intermediate",
    "64",
    "--target-vision-hidden",
    "32",
    "--distill-scenes",
    "8",
    "--shard-size",
    "4",
    "--pretrain-scenes",
    "20",
    "--text-pretrain-steps",
    "3",
    "--text-distill-steps",
    "3",
    "--vlm-steps",
    "3",
    "--draft-hidden",
    "32",
    "--draft-layers",
    "1",
    "--draft-heads",
    "2",
    "--max-new-tokens",
    "12",
    "--checkpoint-every",
    "2",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, ray_local):
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("make_demo")
    assert make_demo_main([*TINY, "--out", str(root / "models"), "--work-dir", str(root / "work")]) == 0
    return root


def outputs_glob(demo):
    return str(demo / "work" / "outputs" / "*" / "*.parquet")


def test_make_demo_family_loads_and_decodes_losslessly_through_the_engine(demo):
    models = demo / "models"
    for stage, steps in (("vision", 2), ("llava", 4), ("finetune", 2)):
        assert last_step(demo / "work" / "target" / stage) == steps, stage
    target = load_target(str(models / "target"), device="cpu", dtype="float32")
    assert render("what is it?", target.processor) == "USER: <image>\nwhat is it? ASSISTANT:"
    requests = scene_requests([make_scene(1, i) for i in range(3)], "caption", target.processor)
    eos = target.tokenizer.eos_token_id
    reference = decode_all(target.model, None, requests, max_new_tokens=10, eos_token_id=eos)
    for kind in ("text", "vlm"):
        draft = build_draft(DraftSettings(kind, str(models / f"draft-{kind}"), gamma=3), target)
        results = decode_all(target.model, draft, requests, max_new_tokens=10, eos_token_id=eos)
        assert [r.tokens for r in results] == [r.tokens for r in reference]
        assert all(r.metrics.proposed_tokens > 0 for r in results)
        info = json.loads((models / f"draft-{kind}" / "draft_training.json").read_text())
        assert info["kind"] == kind and info["rows"] == 24  # 8 scenes x 3 tasks


def test_vlm_draft_carries_a_copy_of_the_target_vision_tower(demo):
    target = load_file(demo / "models" / "target" / "model.safetensors")
    draft = load_file(demo / "models" / "draft-vlm" / "model.safetensors")
    tower = [k for k in target if "vision_tower" in k]
    assert tower and all(torch.equal(target[k], draft[k]) for k in tower)
    assert any("multi_modal_projector" in k for k in draft)


def test_distillation_outputs_follow_the_output_schema(demo):
    files = sorted((demo / "work" / "outputs").glob("*/*.parquet"))
    assert len(files) == 6  # 2 shards x 3 tasks
    for f in files:
        table = pq.read_table(f)
        assert table.schema.remove_metadata() == OUTPUT_SCHEMA
        assert table.num_rows == 4 and table.column("error").null_count == 4


def test_train_draft_resumes_from_its_last_checkpoint(demo, tmp_path, capsys):
    args = [
        "--target",
        str(demo / "models" / "target"),
        "--kind",
        "text",
        "--outputs",
        outputs_glob(demo),
        "--out",
        str(tmp_path / "draft"),
        "--hidden",
        "32",
        "--layers",
        "1",
        "--heads",
        "2",
        "--pretrain-steps",
        "5",  # no --text: stage 1 does not run, and draft_training.json must say so
        "--checkpoint-every",
        "1",
        "--batch-size",
        "4",
    ]
    assert train_draft_main([*args, "--steps", "2"]) == 0
    work = tmp_path / "draft-work" / "distill"
    assert last_step(work) == 2
    assert train_draft_main([*args, "--steps", "5"]) == 0
    assert "resuming at step 2" in capsys.readouterr().out
    assert last_step(work) == 5
    assert [int(line.split("\t")[0]) for line in (work / "loss.tsv").read_text().splitlines()] == [0, 1, 2, 3, 4]
    saved = tmp_path / "draft"
    assert json.loads((saved / "draft_training.json").read_text())["pretrain_steps"] == 0
    # readable like the rest of the checkpoint (save_pretrained writes the weights through a 0600 temporary file)
    assert (saved / "model.safetensors").stat().st_mode & 0o777 == (saved / "config.json").stat().st_mode & 0o777


def test_train_draft_help_shows_each_default_once_and_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        train_draft_main(["--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: [])" not in text
    assert "(default: <out>-work)" in text and text.count("default: <out>-work") == 1
    flat = " ".join(text.split())
    assert "--lr LR peak learning rate" in flat and "--warmup WARMUP steps of linear learning-rate warmup" in flat
    assert "--batch-size BATCH_SIZE examples per training step" in flat


class Interrupt(Exception):
    pass


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    tokenizer = build_tokenizer(["a b c d e f g"] * 4, vocab_size=280)
    examples = [Example([1, 5 + i % 7, 6, 7 + i % 3, 2], 1) for i in range(16)]
    config = TrainConfig(steps=6, lr=1e-2, warmup=2, checkpoint_every=2)

    def batches(step, stop_at=None):
        if step == stop_at:
            raise Interrupt
        return examples[(step * 4) % 16 : (step * 4) % 16 + 4]

    straight = train(build_text_lm(tokenizer, seed=3), batches, config, tmp_path / "straight", pad_id=3)
    with pytest.raises(Interrupt):
        train(build_text_lm(tokenizer, seed=3), lambda s: batches(s, stop_at=5), config, tmp_path / "cut", pad_id=3)
    assert last_step(tmp_path / "cut") == 4
    seen = []
    resumed = train(
        build_text_lm(tokenizer, seed=3), lambda s: seen.append(s) or batches(s), config, tmp_path / "cut", pad_id=3
    )
    assert seen == [4, 5]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_init_draft_with_another_tokenizer_is_refused(demo, tmp_path, capsys):
    other = build_tokenizer(["completely different words here"] * 8, vocab_size=300)
    stranger = build_text_lm(other, hidden=32)
    stranger.save_pretrained(tmp_path / "stranger")
    other.save_pretrained(tmp_path / "stranger")
    code = train_draft_main(
        [
            "--target",
            str(demo / "models" / "target"),
            "--kind",
            "text",
            "--outputs",
            outputs_glob(demo),
            "--out",
            str(tmp_path / "draft"),
            "--init",
            str(tmp_path / "stranger"),
            "--steps",
            "1",
        ]
    )
    assert code == 2
    assert "does not share the target's vocabulary" in capsys.readouterr().err


def test_outputs_of_another_target_are_refused(demo):
    rows = read_outputs([outputs_glob(demo)])
    other = build_tokenizer(["completely different words here"] * 8, vocab_size=300)
    with pytest.raises(ModelLoadError, match="not generated with the tokenizer"):
        check_tokenizer(rows, other, "other-target")


def test_images_are_joined_back_from_parquet_shards_by_source_and_key(tmp_path):
    uris = write_parquet_shards(str(tmp_path / "in"), seed=4, num_shards=2, per_shard=3)
    rows = [{"source": uris[1], "key": make_scene(4, 4).key}, {"source": uris[0], "key": make_scene(4, 0).key}]
    images = load_images(rows)
    assert set(images) == {(r["source"], r["key"]) for r in rows}
    with pytest.raises(OutputsError, match="not found in their input shard"):
        load_images([{"source": uris[0], "key": make_scene(4, 4).key}])


def test_token_outcomes_follow_the_chain_steps():
    # gamma 3: step 1 accepts 1 (then a rejected position), step 2 accepts all 3 (then an unproposed bonus
    # token), step 3 accepts 0 (its target token is a rejected position).
    assert token_outcomes(10, [1, 3, 0], 3) == [True, False, True, True, True, None, False]
    assert token_outcomes(2, [3], 3) == [True, True]  # EOS was among the accepted drafts


def test_content_tokens_mark_content_words_and_their_first_piece():
    tokenizer = build_demo_tokenizer(scenes=200)
    ids = tokenizer(" a small yellow triangle on a gray background.", add_special_tokens=False).input_ids
    ids.append(tokenizer.eos_token_id)
    pieces = [tokenizer.decode([t]) for t in ids]
    classes = content_tokens(ids, tokenizer)
    firsts = [piece.strip() for piece, (_, first) in zip(pieces, classes) if first]
    assert [f[0] for f in firsts] == ["s", "y", "t", "g"]  # small, yellow, triangle, gray
    content = "".join(piece if is_content else " " for piece, (is_content, _) in zip(pieces, classes))
    assert content.split() == ["small", "yellow", "triangle", "gray"]
    template = [c for piece, c in zip(pieces, classes) if piece in (" a", " on", " background", ".")]
    assert template == [(False, False)] * 5
    assert classes[-1] == (False, False)  # EOS
