"""Token-level stop conditions, checked after each sampled token is appended.

Stop *strings* need text and are the frontend's job (the detokenizer aborts the request).
"""

from __future__ import annotations

from sluice.core.request import Request, RequestStatus


def check_stop(request: Request, max_model_len: int) -> bool:
    """Decide whether `request` is done after its latest output token; if so set its `status`
    (and `stop_reason` for a stop token) and return True.

    Order: before `min_tokens` outputs, EOS and stop tokens are ignored. Then EOS (unless
    `ignore_eos`) → STOPPED; a token of `stop_token_ids` → STOPPED with `stop_reason` = that
    token; otherwise `max_tokens` outputs or `max_model_len` total tokens → LENGTH_CAPPED.
    The finishing token stays in `output_token_ids`.
    """
    params = request.sampling_params
    last_token_id = request.output_token_ids[-1]
    if request.num_output_tokens >= params.min_tokens:
        if not params.ignore_eos and last_token_id == request.eos_token_id:
            request.status = RequestStatus.FINISHED_STOPPED
            return True
        if last_token_id in params.stop_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = last_token_id
            return True
    if request.num_tokens >= max_model_len or (
            params.max_tokens is not None and request.num_output_tokens >= params.max_tokens):
        request.status = RequestStatus.FINISHED_LENGTH_CAPPED
        return True
    return False
