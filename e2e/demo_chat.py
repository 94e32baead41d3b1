"""The demo's example `chat` fleet served for real (called by `e2e/demo.py`).

`examples/04-fleet.yaml` is a disaggregated fleet of two variants: the base SmolLM2-135M-Instruct and
`smollm2-support`, a LoRA adapter read from the PVC `adapters` (a hostPath PV here). The demo puts a real
adapter there (`kvfleet model finetune`'s bible-lora: r=16, alpha=32 as the example declares; trained
once, ~1.5 min, cached), opts the fleet's pods into the pod runner, and asks both variants through the
fleet's router with the `openai` SDK: one set of base prefill/decode pods serves both, and the adapter's
answer is its own.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

ADAPTERS_HOST_DIR = Path("/tmp/kvfleet-demo-adapters")  # the hostPath behind the PVC `adapters`
PROMPT = "And God said unto Noah,"


def place_adapter() -> Path:
    """The trained bible-lora adapter, copied where the example's PVC subPath `support-v3` points."""
    from kvfleet.tools.finetune import RECIPES, finetune_dir

    recipe = next(r for r in RECIPES if r.name == "bible-lora")
    src = finetune_dir(recipe)
    dest = ADAPTERS_HOST_DIR / "support-v3"
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dest)
    return src


def serve_example_chat(demo: Any, step: Callable[[str], None], wait_for: Callable[..., Any],
                       serving_pod_ips: Callable[..., list[str]], namespace: str) -> None:
    from openai import OpenAI

    step("the example `chat` fleet for real: base + LoRA `smollm2-support` on ONE set of base prefill/decode "
         "pods (int8 KV, memory pool); a trained adapter goes on the PVC, the fleet's pods now run locally")
    print(f"adapter: {place_adapter()} -> {ADAPTERS_HOST_DIR / 'support-v3'} (hostPath PV of the PVC `adapters`)")
    demo.kubectl("patch", "fleet", "chat", "-n", namespace, "--type=merge", "-p",
                 '{"spec":{"podAnnotations":{"kvfleet.io/run-locally":"true"}}}', show=True)
    sel = "kvfleet.io/fleet=chat"

    def serving(role: str, port: int) -> list[str]:
        pods = demo.get("pods", "-n", namespace, "-l", f"{sel},kvfleet.io/role={role}")["items"]
        local = [p for p in pods if (p["metadata"].get("annotations") or {}).get("kvfleet.io/run-locally")]
        return serving_pod_ips(local, port=port)

    for role, port, n in (("prefill", 8080, 1), ("decode", 8080, 2), ("mempool", 8080, 1), ("router", 8000, 1)):
        wait_for(f"{n} local {role} pod(s) of chat", lambda r=role, p=port, k=n: len(serving(r, p)) >= k or None, 300)
    demo.kubectl("get", "deployments,statefulsets", "-n", namespace, "-l", sel, show=True)
    (router_ip,) = serving("router", 8000)
    client = OpenAI(base_url=f"http://{router_ip}:8000/v1", api_key="demo", max_retries=0, timeout=120)

    def ask(model: str) -> str | None:
        try:
            r = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0)
            return r.choices[0].text
        except Exception:  # noqa: BLE001 - 429/503 until the router's watch has seen ready pods
            return None

    for m in client.models.list().data:
        print(f"  /v1/models: {m.id}" + (f" (parent {m.parent})" if getattr(m, "parent", None) else ""))
    answers = {model: wait_for(f"an answer from {model}", lambda m=model: ask(m), 120)
               for model in ("smollm2", "smollm2-support")}
    for model, text in answers.items():
        print(f"  [{model}] {PROMPT!r} -> {text!r}")
    if answers["smollm2"] == answers["smollm2-support"]:
        raise RuntimeError("the LoRA variant answered exactly as the base: its adapter was not applied")
    demo.kubectl("get", "fleet", "chat", "-n", namespace, "-o",
                 "custom-columns=NAME:.metadata.name,ADAPTERS:.status.adapters", show=True)
    step("the chat fleet's pods go back to KWOK-only (frees the CPU for what follows)")
    demo.kubectl("patch", "fleet", "chat", "-n", namespace, "--type=json", "-p",
                 '[{"op":"remove","path":"/spec/podAnnotations"}]', show=True)
