"""The router's disaggregated mode (vLLM's disagg proxy flow, Dynamo's prefill/decode roles).

One generation request, two hops::

    client ─► router ─► prefill worker   the body with max_tokens=1, stream=false and
                  │                      kv_transfer_params {"do_remote_decode": true}; it
                  │                      computes the prompt's KV and answers with the
                  │                      kv_transfer_params naming the blocks it now holds
                  └───► decode worker    the client's body plus those kv_transfer_params; it
                                         pulls the blocks (ZmqPullConnector) and generates;
                                         its response (streamed or not) goes to the client

The prefill worker is chosen by the router mode among healthy workers with role prefill (kv
mode uses their KV events, as in aggregated mode); the decode worker is the least-loaded
healthy decode worker. A prefill worker that refuses the connection is marked down and the next
one is tried; a prefill error response (4xx: the request is bad) is the client's answer; a
prefill that returns no kv_transfer_params (e.g. a stop string ended it) lets the decode worker
compute the prompt itself. A client's own `kv_transfer_params` is a 400: the router owns them.
Torch-free.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import httpx
from fastapi import Request
from fastapi.responses import Response

from sluice.entrypoints.router.workers import Worker, mark_down

logger = logging.getLogger("sluice.router")

ROLES = ("prefill", "decode", "both")


def prefill_body(payload: dict[str, Any]) -> dict[str, Any]:
    """What the prefill worker gets: one token, not streamed, holding the KV for a decode."""
    body = {k: v for k, v in payload.items()
            if k not in ("stream", "stream_options", "min_tokens", "n", "best_of")}
    body["max_tokens"] = 1
    if "max_completion_tokens" in body:
        body["max_completion_tokens"] = 1
    body["kv_transfer_params"] = {"do_remote_decode": True}
    return body


async def run_prefill(state: Any, path: str, payload: dict[str, Any],
                      headers: dict[str, str]) -> tuple[dict[str, Any] | None, Response | None]:
    """Send the prefill hop. Returns (kv_transfer_params or None, None), or (None, a response
    to give the client instead: the prefill's own error, or 503 when no prefill worker
    answers)."""
    from sluice.entrypoints.router.app import error_json, prompt_hashes
    body = prefill_body(payload)
    prompt = None
    if state.router.mode == "kv":
        prompt = await prompt_hashes(state, path, payload, headers)
    tried: set[Worker] = set()
    while candidates := [w for w in state.pool.healthy("prefill") if w not in tried]:
        decision = state.router.choose(candidates, prompt)
        worker = decision.worker
        worker.outstanding += 1
        start = time.perf_counter()
        try:
            response = await state.client.post(worker.url + path, json=body, headers=headers)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            worker.errors["connect"] += 1
            mark_down(worker, f"connection failed ({type(e).__name__})")
            tried.add(worker)
            continue
        except httpx.HTTPError as e:
            worker.errors["upstream"] += 1
            return None, error_json(502, f"The prefill worker {worker.url} failed: "
                                         f"{type(e).__name__}.")
        finally:
            worker.outstanding -= 1
        decision.worker.routed[state.router.mode] += 1
        stats = state.stats
        stats.prefill_seconds_sum += time.perf_counter() - start
        stats.prefill_count += 1
        if response.status_code != 200:
            return None, Response(response.content, status_code=response.status_code,
                                  media_type=response.headers.get("content-type"))
        try:
            params = response.json().get("kv_transfer_params")
        except ValueError:
            params = None
        if params is None:
            stats.kv_transfers_missing += 1
            logger.warning("prefill worker %s returned no kv_transfer_params; the decode "
                           "worker computes the prompt", worker.url)
        return params, None
    return None, error_json(503, "No healthy prefill worker to route the request to "
                                 f"({len(state.pool.with_role('prefill'))} registered).")


async def proxy_disaggregated(state: Any, request: Request, path: str) -> Response:
    """The two hops of one generation request (see the module docstring)."""
    from sluice.entrypoints.router.app import _request_headers, error_json, proxy_generation
    body = await request.body()
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):   # the decode worker answers the 400
        return await proxy_generation(state, request, path, body=body, role="decode")
    if payload.get("kv_transfer_params") is not None:
        return error_json(400, "kv_transfer_params is set by the router in disaggregated "
                               "mode; leave it out.", param="kv_transfer_params")
    if not state.pool.healthy("decode"):   # do not make a prefill hold blocks for nobody
        state.stats.responses["5xx"] += 1
        return error_json(503, "No healthy decode worker to route the request to "
                               f"({len(state.pool.with_role('decode'))} registered).")
    params, answer = await run_prefill(state, path, payload, _request_headers(request))
    if answer is not None:
        state.stats.responses[f"{answer.status_code // 100}xx"] += 1
        return answer
    if params is not None:
        payload = {**payload, "kv_transfer_params": params}
        state.stats.kv_transfers += 1
    return await proxy_generation(state, request, path, body=json.dumps(payload).encode(),
                                  role="decode")
