"""ComfyUI's side of the adapter that needs no server: the graph a task patches, what the
ws events and /history entries mean for our prompt, ComfyUI's refusals read into a reason,
and where /queue shows a prompt (which decides delete or interrupt on a cancel)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gpuqueue.fleet.endpoint_specs import DEFAULT_TXT2IMG_GRAPH, default_workflow
from gpuqueue.gpu.comfyui_client import (
    Happening,
    history_outcome,
    patched_graph,
    prompt_refusal,
    queue_place,
    read_event,
    task_seed,
)
from gpuqueue.models import ComfyWorkflow, ImageParams, Task, TaskStatus

WORKFLOW = ComfyWorkflow.model_validate(default_workflow("sd15.safetensors"))


def task(seed: int | None = 42, negative: str | None = "blurry", task_id: str = "t-1") -> Task:
    return Task(
        task_id=task_id,
        user_id="u-1",
        status=TaskStatus.RUNNING,
        prompt="a red fox in snow",
        negative_prompt=negative,
        params=ImageParams(width=640, height=448, steps=12, seed=seed),
        created_at="2026-01-27T10:00:00.000000Z",
        updated_at="2026-01-27T10:00:00.000000Z",
    )


def event(kind: str, **data: Any) -> str:
    return json.dumps({"type": kind, "data": data})


# --- the graph ------------------------------------------------------------------------------


def test_the_task_is_set_at_the_workflows_nodes_and_the_template_is_untouched() -> None:
    graph = patched_graph(WORKFLOW, task())

    assert graph["6"]["inputs"]["text"] == "a red fox in snow"
    assert graph["7"]["inputs"]["text"] == "blurry"
    assert graph["3"]["inputs"]["seed"] == 42
    assert graph["3"]["inputs"]["steps"] == 12
    assert graph["5"]["inputs"] == {"width": 640, "height": 448, "batch_size": 1}
    assert graph["4"]["inputs"]["ckpt_name"] == "sd15.safetensors"
    assert graph["3"]["inputs"]["model"] == ["4", 0]  # links stay links
    assert WORKFLOW.graph["6"]["inputs"]["text"] == ""  # the endpoint's copy is not changed
    assert DEFAULT_TXT2IMG_GRAPH["4"]["inputs"]["ckpt_name"] == ""


def test_no_negative_prompt_clears_the_negative_node() -> None:
    assert patched_graph(WORKFLOW, task(negative=None))["7"]["inputs"]["text"] == ""


def test_no_seed_is_a_seed_of_the_tasks_own_the_same_on_a_retry() -> None:
    one, again, other = task(None, task_id="a"), task(None, task_id="a"), task(None, task_id="b")

    assert task_seed(one) == task_seed(again) != task_seed(other)
    assert 0 <= task_seed(one) < 2**48
    assert patched_graph(WORKFLOW, one)["3"]["inputs"]["seed"] == task_seed(one)


def test_a_seed_under_another_input_name_is_set_there() -> None:
    graph = {
        "1": {"class_type": "CLIPTextEncode", "inputs": {"text": ""}},
        "2": {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}},
    }
    workflow = ComfyWorkflow(
        graph=graph, prompt_node="1", seed_node="2", seed_input="noise_seed", output_node="3"
    )

    assert patched_graph(workflow, task(seed=7))["2"]["inputs"] == {"noise_seed": 7}


def test_a_workflow_without_seed_or_batch_inputs_gets_none_added() -> None:
    """A graph whose sampler draws its own seed, and a size node without `batch_size`
    (a custom latent node): nothing is set that ComfyUI would refuse as an unknown input."""
    graph = {
        "1": {"class_type": "CLIPTextEncode", "inputs": {"text": ""}},
        "2": {"class_type": "SDXLEmptyLatent", "inputs": {"width": 64, "height": 64}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 11, "steps": 4}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}},
    }
    workflow = ComfyWorkflow(
        graph=graph, prompt_node="1", size_node="2", steps_node="3", output_node="4"
    )

    patched = patched_graph(workflow, task(seed=7))

    assert patched["2"]["inputs"] == {"width": 640, "height": 448}
    assert patched["3"]["inputs"] == {"seed": 11, "steps": 12}


# --- ws events ------------------------------------------------------------------------------


def test_progress_of_the_steps_node_is_the_tasks_step() -> None:
    message = event("progress", value=3, max=12, prompt_id="p1", node="3")

    assert read_event(message, "p1", "3") == Happening("progress", step=3, steps=12)


@pytest.mark.parametrize(
    "message",
    [
        event("progress", value=3, max=12, prompt_id="p1", node="11"),  # an upscaler's count
        event("progress", value=3, max=12, prompt_id="other", node="3"),  # another prompt
        event("progress", value=3, max=0, prompt_id="p1", node="3"),
        event("status", status={"exec_info": {"queue_remaining": 1}}, sid="c"),
        event("executing", node="3", prompt_id="p1"),  # one more node started
        event("execution_start", prompt_id="p1", timestamp=1),
        event("execution_success", prompt_id="other"),
        b"\x00\x00\x00\x01\x00\x00\x00\x02\x89PNG",  # a preview image
        "not json",
        json.dumps(["a list"]),
    ],
)
def test_what_is_not_our_prompts_news_is_ignored(message: str | bytes) -> None:
    assert read_event(message, "p1", "3") is None


def test_the_ends_of_a_prompt() -> None:
    assert read_event(event("execution_success", prompt_id="p1"), "p1", "3") == Happening(
        "succeeded"
    )
    assert read_event(event("executing", node=None, prompt_id="p1"), "p1", "3") == Happening(
        "finished"
    )
    assert read_event(event("execution_interrupted", prompt_id="p1"), "p1", "3") == Happening(
        "interrupted"
    )
    failed = read_event(
        event(
            "execution_error",
            prompt_id="p1",
            node_id="3",
            node_type="KSampler",
            exception_type="torch.OutOfMemoryError",
            exception_message="Allocation on device\nran out of memory on your GPU",
        ),
        "p1",
        "3",
    )
    assert failed is not None
    assert failed.kind == "failed"
    assert "node 3 (KSampler)" in failed.message
    assert "torch.OutOfMemoryError" in failed.message
    assert "ran out of memory on your GPU" in failed.message


# --- /history -------------------------------------------------------------------------------


def history(status_str: str, *messages: list[Any]) -> dict[str, Any]:
    return {
        "outputs": {},
        "status": {
            "status_str": status_str,
            "completed": status_str == "success",
            "messages": list(messages),
        },
    }


def test_history_tells_interrupted_from_failed_though_both_read_error() -> None:
    start = ["execution_start", {"prompt_id": "p1"}]
    interrupted = history("error", start, ["execution_interrupted", {"prompt_id": "p1"}])
    failed = history(
        "error", start, ["execution_error", {"prompt_id": "p1", "exception_message": "boom"}]
    )

    assert history_outcome(history("success", start)) == Happening("succeeded")
    assert history_outcome(interrupted) == Happening("interrupted")
    outcome = history_outcome(failed)
    assert outcome is not None
    assert outcome.kind == "failed"
    assert "boom" in outcome.message


def test_history_without_a_final_status_is_not_an_end_yet() -> None:
    assert history_outcome(history("running")) is None


def test_an_error_history_without_a_readable_message_is_still_a_failure() -> None:
    odd = history("error", ["execution_start"], ["execution_error", "boom"], [1, 2, 3])

    assert history_outcome(odd) == Happening(
        "failed", message="ComfyUI reported an error without its message"
    )


def test_a_very_old_history_without_status_succeeded_when_it_has_outputs() -> None:
    assert history_outcome({"outputs": {"9": {"images": []}}, "status": None}) == Happening(
        "succeeded"
    )
    assert history_outcome({"outputs": {}, "status": None}) is None


# --- refusals from POST /prompt -------------------------------------------------------------


def test_a_refusal_names_the_node_and_input_in_the_new_shape() -> None:
    body = {
        "error": {
            "type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation",
            "details": "",
            "extra_info": {},
        },
        "node_errors": {
            "4": {
                "errors": [
                    {
                        "type": "value_not_in_list",
                        "message": "Value not in list",
                        "details": "ckpt_name: 'x.safetensors' not in []",
                    }
                ],
                "class_type": "CheckpointLoaderSimple",
            }
        },
    }

    reason = prompt_refusal(body)

    assert reason.startswith("Prompt outputs failed validation")
    assert "node 4 (CheckpointLoaderSimple): Value not in list ckpt_name: 'x.safetensors'" in reason


def test_a_refusal_in_the_old_shape_string_error_and_list_node_errors() -> None:
    assert prompt_refusal({"error": "no prompt", "node_errors": []}) == "no prompt"
    assert prompt_refusal("<html>") == "ComfyUI refused the workflow"


# --- /queue ---------------------------------------------------------------------------------


def test_where_the_queue_shows_our_prompt() -> None:
    queue = {
        "queue_running": [[1, "running-one", {}, {}, ["9"]]],
        "queue_pending": [[3, "later", {}, {}, ["9"]], [2, "next", {}, {}, ["9"]]],
    }

    assert queue_place(queue, "running-one") == "running"
    assert queue_place(queue, "later") == "pending"
    assert queue_place(queue, "finished-or-deleted") == "gone"
    assert queue_place(None, "later") == "unknown"
