"""POST /tokenize and /detokenize, as vLLM has them: what a client needs to count and budget tokens."""

from __future__ import annotations

from fastapi import APIRouter, Request

from shoal.server.chat import render_chat
from shoal.server.errors import ERROR_RESPONSES
from shoal.server.offload import messages_size, prepare
from shoal.server.params import check_token_ids
from shoal.server.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from shoal.server.state import ServerState, get_state

router = APIRouter()


def _tokenize(state: ServerState, body: TokenizeRequest) -> list[int]:
    if body.messages is not None:
        return render_chat(state, body)
    add_special = True if body.add_special_tokens is None else body.add_special_tokens
    return state.engine.tokenizer.encode(body.prompt or "", add_special_tokens=add_special)


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """A prompt (with special tokens by default) or chat messages (through the chat template) to token ids."""
    state = get_state(request)
    state.check_model(body.model)
    size = messages_size(body.messages) if body.messages is not None else len(body.prompt or "")
    ids = await prepare(_tokenize, state, body, size=size)
    strs = state.engine.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """Token ids to text (special tokens kept, as vLLM does)."""
    state = get_state(request)
    state.check_model(body.model)
    check_token_ids(body.tokens, state.vocab_size, "tokens")
    return DetokenizeResponse(prompt=state.engine.tokenizer.decode(body.tokens, skip_special_tokens=False))
