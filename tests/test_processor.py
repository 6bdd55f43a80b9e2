"""build_processor: speculative decoding as a transform of any Ray Dataset, the way Ray Data LLM users apply a
processor, with output identical to the target's own greedy decoding."""

import io

import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.config import ComputeConfig, ConfigError, DecodeSettings, TaskConfig
from pipeline.processor import ProcessorConfig, build_processor, row_record
from pipeline.schema import OUTPUT_SCHEMA
from specvlm.demo.world import make_scene
from specvlm.engine import DraftSettings, TargetSettings
from tests.test_pipeline import MAX_NEW, SEED, expected_tokens


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def processor_config(models, **changes) -> ProcessorConfig:
    settings = {
        "task": TaskConfig(kind="vqa"),
        "model": TargetSettings(target=str(models / "target")),
        "draft": DraftSettings(kind="vlm", path=str(models / "draft"), gamma=3),
        "decode": DecodeSettings(max_new_tokens=MAX_NEW),
        "compute": ComputeConfig(batch_size=4),
    }
    return ProcessorConfig(**{**settings, **changes})


def test_processor_decodes_an_in_memory_dataset_of_every_image_kind(family, models, tmp_path, ray_local):
    import ray

    scenes = [make_scene(SEED, i) for i in range(5)]
    (tmp_path / "scene3.png").write_bytes(png(scenes[3].image))
    images = {
        "bytes": png(scenes[0].image),
        "pil": scenes[1].image,
        "numpy": np.asarray(scenes[2].image),
        "path": str(tmp_path / "scene3.png"),
        "hf": {"bytes": png(scenes[4].image), "path": None},  # a Hugging Face datasets Image value
    }
    rows = [
        {"img": image, "ask": s.question, "truth": s.answer, "id": kind}
        for (kind, image), s in zip(images.items(), scenes)
    ]
    rows += [{"img": b"not an image", "ask": "What is shown?", "id": "broken"}, {"img": 17, "id": "int"}]
    processor = build_processor(
        processor_config(models),
        # The hooks map one row to one row, as Ray Data LLM's do: here they rename the user's columns.
        preprocess=lambda row: {
            "image": row["img"],
            "question": row.get("ask"),
            "answer": row.get("truth"),
            "key": row["id"],
        },
        postprocess=lambda row: {**row, "words": len((row["text"] or "").split())},
    )
    out = {row["key"]: row for row in processor(ray.data.from_items(rows)).take_all()}

    assert sorted(out) == sorted([*images, "broken", "int"])
    for kind, scene in zip(images, scenes):
        row = out[kind]
        assert list(row) == [*OUTPUT_SCHEMA.names, "words"], "the output schema's columns, then postprocess's"
        assert row["error"] is None and row["prompt"] == f"USER: <image>\n{scene.question} ASSISTANT:", kind
        assert list(row["output_ids"]) == expected_tokens(family, {"image": png(scene.image)}, row["prompt"]), kind
        assert row["text"] == family.tokenizer.decode(list(row["output_ids"]), skip_special_tokens=True).strip()
        assert row["reference"] == scene.answer and row["config_hash"] == processor.config_hash
    assert out["path"]["source"] == str(tmp_path / "scene3.png")
    assert "not a recognised image" in out["broken"]["error"] and out["broken"]["stop_reason"] == "error"
    assert "cannot read the image in column 'image'" in out["int"]["error"] and out["int"]["text"] is None


def test_rows_without_a_key_are_named_by_their_content():
    rows = [{"image": b"first image", "question": "a?"}, {"image": b"second image", "question": "a?"}]
    keys = [row_record(row, "image", {})["key"] for row in rows]
    again = [row_record(row, "image", {})["key"] for row in rows[::-1]]
    assert len(set(keys)) == 2 and again == keys[::-1], "the same row gets the same key (and sampling seed)"


def test_a_missing_model_is_refused_before_any_ray_work(models, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.target"):
        build_processor(processor_config(models, model=TargetSettings(target=str(tmp_path / "no-model"))))
    with pytest.raises(ValidationError, match=r"storage_options[^$]*looks like a credential"):
        processor_config(models, storage_options={"secret": "hunter2"})
