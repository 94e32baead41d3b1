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
                 "custom-columns=NAME:.metadata.name,ADAPTERS:.status.adapters,KV-SHARING:.status.kvSharing",
                 show=True)
    share_kv(demo, step, wait_for, serving, namespace)
    step("the chat fleet's pods go back to KWOK-only (frees the CPU for what follows)")
    demo.kubectl("patch", "fleet", "chat", "-n", namespace, "--type=json", "-p",
                 '[{"op":"remove","path":"/spec/podAnnotations"}]', show=True)


def share_kv(demo: Any, step: Callable[[str], None], wait_for: Callable[..., Any],
             serving: Callable[[str, int], list[str]], namespace: str) -> None:
    """DroidSpeak on the chat fleet: profile smollm2-base -> smollm2-support on the real weights, apply the
    profile (auto mode) and the family-shared CachePolicy, and show the adapter reusing the base's KV."""
    import json
    import subprocess
    import sys
    import tempfile
    import time

    from kvfleet.dataplane.model.smollm2 import smollm2_dir
    from openai import OpenAI

    from e2e.harness import metric_value
    from kvfleet.tools.finetune import corpus_text

    step("cross-variant KV reuse (DroidSpeak): `kvfleet profile-sharing` measures smollm2-base -> smollm2-support "
         "on the real weights; the profile goes into a ConfigMap, the variant switches to kvSharing auto and the "
         "fleet to the family-shared CachePolicy")
    work = Path(tempfile.mkdtemp(prefix="kvfleet-demo-profile-"))
    (work / "calibration.txt").write_text(corpus_text("bible")[:20000])
    base = str(smollm2_dir())
    subprocess.run([sys.executable, "-m", "kvfleet", "profile-sharing", "--base", base, "--from", base,
                    "--to", str(ADAPTERS_HOST_DIR / "support-v3"), "--from-variant", "smollm2-base",
                    "--to-variant", "smollm2-support", "--family", "smollm2-135m",
                    "--calibration", str(work / "calibration.txt"), "--out", str(work / "profile.json"),
                    "--max-prompts", "2", "--prompt-tokens", "128", "--continuation-tokens", "32"], check=True)
    demo.kubectl("create", "configmap", "support-profile", "-n", namespace,
                 f"--from-file=profile.json={work / 'profile.json'}", show=True)
    demo.kubectl("patch", "modelvariant", "smollm2-support", "-n", namespace, "--type=merge", "-p",
                 json.dumps({"spec": {"kvSharing": {"mode": "auto", "recomputeLayers": None,
                                                    "profile": {"configMap": "support-profile"}}}}), show=True)
    demo.kubectl("patch", "fleet", "chat", "-n", namespace, "--type=merge", "-p",
                 '{"spec":{"cachePolicy":"family-shared"}}', show=True)

    def in_effect() -> Any:
        rows = (demo.get("fleet", "chat", "-n", namespace).get("status") or {}).get("kvSharing") or []
        return rows if rows and rows[0].get("inEffect") else None

    rows = wait_for("status.kvSharing in effect", in_effect, 60)
    print(f"  status.kvSharing: {json.dumps(rows)}")
    wait_for("the chat fleet's pods on the new policy", lambda: demo.condition("fleet", "chat", "Progressing") == "False"
             and demo.condition("fleet", "chat", "Available") == "True" or None, 300)
    for role, port in (("prefill", 8080), ("decode", 8080), ("router", 8000)):
        wait_for(f"a local {role} pod of chat", lambda r=role, p=port: serving(r, p) or None, 300)
    (router_ip,) = serving("router", 8000)
    client = OpenAI(base_url=f"http://{router_ip}:8000/v1", api_key="demo", max_retries=0, timeout=120)
    passage = corpus_text("bible")[:1400]

    def ask(model: str, question: str) -> tuple[str, float] | None:
        try:
            start = time.perf_counter()
            stream = client.completions.create(model=model, prompt=f"{passage}\n\nQ: {question}\nA:", max_tokens=16,
                                               temperature=0, stream=True)
            ttft, text = None, ""
            for chunk in stream:
                ttft = ttft if ttft is not None else time.perf_counter() - start
                text += chunk.choices[0].text
            return text, ttft or 0.0
        except Exception:  # noqa: BLE001 - 429/503 until the router has seen the new pods
            return None

    for model, question in (("smollm2", "Who made the firmament?"), ("smollm2-support", "What did God call the light?")):
        text, ttft = wait_for(f"an answer from {model}", lambda m=model, q=question: ask(m, q), 120)
        print(f"  [{model}] {question!r} -> {text.strip()!r} (TTFT {ttft * 1000:.0f} ms)")
    got = wait_for("the router to count reused tokens", lambda: metric_value(
        f"http://{router_ip}:8000", "kvfleet_shared_prefix_tokens_total") or None, 30)
    print(f"  kvfleet_shared_prefix_tokens_total = {got:.0f}: smollm2-support reused smollm2-base's cached blocks, "
          f"recomputing layers {rows[0]['recomputeLayers']}")
