from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Sampling(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "has_seed", "seed", "stop_token_ids", "ignore_eos", "logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    HAS_SEED_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    has_seed: bool
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    logprobs: int
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    logit_bias: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    min_tokens: int
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., has_seed: _Optional[bool] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., logprobs: _Optional[int] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., logit_bias: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ..., min_tokens: _Optional[int] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class Logprob(_message.Message):
    __slots__ = ("token_id", "logprob", "top")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    top: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class Request(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "variant", "slo_class")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    SLO_CLASS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: Sampling
    variant: str
    slo_class: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., variant: _Optional[str] = ..., slo_class: _Optional[str] = ...) -> None: ...

class KVTarget(_message.Message):
    __slots__ = ("address", "reservation")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_FIELD_NUMBER: _ClassVar[int]
    address: str
    reservation: str
    def __init__(self, address: _Optional[str] = ..., reservation: _Optional[str] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request", "target", "pool")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    request: Request
    target: KVTarget
    pool: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request: _Optional[_Union[Request, _Mapping]] = ..., target: _Optional[_Union[KVTarget, _Mapping]] = ..., pool: _Optional[_Iterable[str]] = ...) -> None: ...

class PrefillReply(_message.Message):
    __slots__ = ("first_token_id", "logprob", "finish_reason", "num_prompt_tokens", "num_cached_prompt_tokens", "kv_bytes", "kv_blocks", "prefill_s", "transfer_s", "transfer_ok", "num_pool_blocks")
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_OK_FIELD_NUMBER: _ClassVar[int]
    NUM_POOL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    first_token_id: int
    logprob: Logprob
    finish_reason: str
    num_prompt_tokens: int
    num_cached_prompt_tokens: int
    kv_bytes: int
    kv_blocks: int
    prefill_s: float
    transfer_s: float
    transfer_ok: bool
    num_pool_blocks: int
    def __init__(self, first_token_id: _Optional[int] = ..., logprob: _Optional[_Union[Logprob, _Mapping]] = ..., finish_reason: _Optional[str] = ..., num_prompt_tokens: _Optional[int] = ..., num_cached_prompt_tokens: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., kv_blocks: _Optional[int] = ..., prefill_s: _Optional[float] = ..., transfer_s: _Optional[float] = ..., transfer_ok: _Optional[bool] = ..., num_pool_blocks: _Optional[int] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("reservation", "layout", "num_blocks", "num_tokens", "index", "block_hash", "payload", "crc32c", "lane", "rng_state", "num_hit_blocks", "num_cached_prompt_tokens")
    RESERVATION_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    RNG_STATE_FIELD_NUMBER: _ClassVar[int]
    NUM_HIT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    reservation: str
    layout: str
    num_blocks: int
    num_tokens: int
    index: int
    block_hash: bytes
    payload: bytes
    crc32c: int
    lane: bool
    rng_state: bytes
    num_hit_blocks: int
    num_cached_prompt_tokens: int
    def __init__(self, reservation: _Optional[str] = ..., layout: _Optional[str] = ..., num_blocks: _Optional[int] = ..., num_tokens: _Optional[int] = ..., index: _Optional[int] = ..., block_hash: _Optional[bytes] = ..., payload: _Optional[bytes] = ..., crc32c: _Optional[int] = ..., lane: _Optional[bool] = ..., rng_state: _Optional[bytes] = ..., num_hit_blocks: _Optional[int] = ..., num_cached_prompt_tokens: _Optional[int] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("blocks", "bytes")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    blocks: int
    bytes: int
    def __init__(self, blocks: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("request_id", "num_prompt_tokens", "max_tokens", "ttl_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_prompt_tokens: int
    max_tokens: int
    ttl_s: float
    def __init__(self, request_id: _Optional[str] = ..., num_prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class ReserveReply(_message.Message):
    __slots__ = ("reservation", "free_blocks")
    RESERVATION_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    reservation: str
    free_blocks: int
    def __init__(self, reservation: _Optional[str] = ..., free_blocks: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request", "reservation", "first_token_id", "pool")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    request: Request
    reservation: str
    first_token_id: int
    pool: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request: _Optional[_Union[Request, _Mapping]] = ..., reservation: _Optional[str] = ..., first_token_id: _Optional[int] = ..., pool: _Optional[_Iterable[str]] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("token_ids", "logprobs", "finish_reason", "num_prompt_tokens", "num_cached_prompt_tokens", "recomputed")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTED_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[Logprob]
    finish_reason: str
    num_prompt_tokens: int
    num_cached_prompt_tokens: int
    recomputed: bool
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[_Union[Logprob, _Mapping]]] = ..., finish_reason: _Optional[str] = ..., num_prompt_tokens: _Optional[int] = ..., num_cached_prompt_tokens: _Optional[int] = ..., recomputed: _Optional[bool] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("reservation",)
    RESERVATION_FIELD_NUMBER: _ClassVar[int]
    reservation: str
    def __init__(self, reservation: _Optional[str] = ...) -> None: ...

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RoleStats(_message.Message):
    __slots__ = ("role", "num_running", "num_waiting", "kv_blocks_total", "kv_blocks_used", "reservations", "prompt_tokens", "generation_tokens", "prefix_cache_hit_tokens", "kv_blocks_received", "kv_bytes_received", "kv_checksum_failures", "recomputes", "kv_blocks_sent", "kv_bytes_sent", "max_model_len", "max_num_seqs", "prompt_tokens_computed", "pool_blocks_fetched", "pool_bytes_fetched", "pool_blocks_offered", "pool_errors", "pool_checksum_failures", "adapters_resident", "shared_prefix_tokens")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    RESERVATIONS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    KV_CHECKSUM_FAILURES_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTES_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_SENT_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    POOL_BLOCKS_FETCHED_FIELD_NUMBER: _ClassVar[int]
    POOL_BYTES_FETCHED_FIELD_NUMBER: _ClassVar[int]
    POOL_BLOCKS_OFFERED_FIELD_NUMBER: _ClassVar[int]
    POOL_ERRORS_FIELD_NUMBER: _ClassVar[int]
    POOL_CHECKSUM_FAILURES_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_RESIDENT_FIELD_NUMBER: _ClassVar[int]
    SHARED_PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    role: str
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    reservations: int
    prompt_tokens: int
    generation_tokens: int
    prefix_cache_hit_tokens: int
    kv_blocks_received: int
    kv_bytes_received: int
    kv_checksum_failures: int
    recomputes: int
    kv_blocks_sent: int
    kv_bytes_sent: int
    max_model_len: int
    max_num_seqs: int
    prompt_tokens_computed: int
    pool_blocks_fetched: int
    pool_bytes_fetched: int
    pool_blocks_offered: int
    pool_errors: int
    pool_checksum_failures: int
    adapters_resident: _containers.RepeatedScalarFieldContainer[str]
    shared_prefix_tokens: int
    def __init__(self, role: _Optional[str] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., reservations: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., generation_tokens: _Optional[int] = ..., prefix_cache_hit_tokens: _Optional[int] = ..., kv_blocks_received: _Optional[int] = ..., kv_bytes_received: _Optional[int] = ..., kv_checksum_failures: _Optional[int] = ..., recomputes: _Optional[int] = ..., kv_blocks_sent: _Optional[int] = ..., kv_bytes_sent: _Optional[int] = ..., max_model_len: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., prompt_tokens_computed: _Optional[int] = ..., pool_blocks_fetched: _Optional[int] = ..., pool_bytes_fetched: _Optional[int] = ..., pool_blocks_offered: _Optional[int] = ..., pool_errors: _Optional[int] = ..., pool_checksum_failures: _Optional[int] = ..., adapters_resident: _Optional[_Iterable[str]] = ..., shared_prefix_tokens: _Optional[int] = ...) -> None: ...

class KVEventsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KVEventBatch(_message.Message):
    __slots__ = ("reset", "stored", "removed", "block_size", "extra_key", "prefix_keys", "shares_from")
    class PrefixKeysEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class SharesFromEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RESET_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXTRA_KEY_FIELD_NUMBER: _ClassVar[int]
    PREFIX_KEYS_FIELD_NUMBER: _ClassVar[int]
    SHARES_FROM_FIELD_NUMBER: _ClassVar[int]
    reset: bool
    stored: _containers.RepeatedScalarFieldContainer[bytes]
    removed: _containers.RepeatedScalarFieldContainer[bytes]
    block_size: int
    extra_key: str
    prefix_keys: _containers.ScalarMap[str, str]
    shares_from: _containers.ScalarMap[str, str]
    def __init__(self, reset: _Optional[bool] = ..., stored: _Optional[_Iterable[bytes]] = ..., removed: _Optional[_Iterable[bytes]] = ..., block_size: _Optional[int] = ..., extra_key: _Optional[str] = ..., prefix_keys: _Optional[_Mapping[str, str]] = ..., shares_from: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PoolBlock(_message.Message):
    __slots__ = ("family", "layout", "slo_class", "block_hash", "payload", "crc32")
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    SLO_CLASS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    family: str
    layout: str
    slo_class: str
    block_hash: bytes
    payload: bytes
    crc32: int
    def __init__(self, family: _Optional[str] = ..., layout: _Optional[str] = ..., slo_class: _Optional[str] = ..., block_hash: _Optional[bytes] = ..., payload: _Optional[bytes] = ..., crc32: _Optional[int] = ...) -> None: ...

class PutReply(_message.Message):
    __slots__ = ("stored", "present", "dropped", "pinned", "evicted", "bytes")
    STORED_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    stored: int
    present: int
    dropped: int
    pinned: int
    evicted: int
    bytes: int
    def __init__(self, stored: _Optional[int] = ..., present: _Optional[int] = ..., dropped: _Optional[int] = ..., pinned: _Optional[int] = ..., evicted: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("family", "layout", "keys")
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    family: str
    layout: str
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, family: _Optional[str] = ..., layout: _Optional[str] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class LookupReply(_message.Message):
    __slots__ = ("num_blocks",)
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    num_blocks: int
    def __init__(self, num_blocks: _Optional[int] = ...) -> None: ...

class PoolStats(_message.Message):
    __slots__ = ("instance", "capacity_bytes", "high_watermark", "used_bytes", "pinned_bytes", "blocks", "pinned_blocks", "lookup_keys", "hit_keys", "get_requests", "put_requests", "insertions", "evictions", "evicted_bytes", "dropped", "bytes_in", "bytes_out", "checksum_failures", "rejected_requests", "block_size_tokens", "kv_dtype", "uptime_s")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    HIGH_WATERMARK_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PINNED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PINNED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_KEYS_FIELD_NUMBER: _ClassVar[int]
    HIT_KEYS_FIELD_NUMBER: _ClassVar[int]
    GET_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PUT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    INSERTIONS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FAILURES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_DTYPE_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    instance: str
    capacity_bytes: int
    high_watermark: float
    used_bytes: int
    pinned_bytes: int
    blocks: int
    pinned_blocks: int
    lookup_keys: int
    hit_keys: int
    get_requests: int
    put_requests: int
    insertions: int
    evictions: int
    evicted_bytes: int
    dropped: int
    bytes_in: int
    bytes_out: int
    checksum_failures: int
    rejected_requests: int
    block_size_tokens: int
    kv_dtype: str
    uptime_s: float
    def __init__(self, instance: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., high_watermark: _Optional[float] = ..., used_bytes: _Optional[int] = ..., pinned_bytes: _Optional[int] = ..., blocks: _Optional[int] = ..., pinned_blocks: _Optional[int] = ..., lookup_keys: _Optional[int] = ..., hit_keys: _Optional[int] = ..., get_requests: _Optional[int] = ..., put_requests: _Optional[int] = ..., insertions: _Optional[int] = ..., evictions: _Optional[int] = ..., evicted_bytes: _Optional[int] = ..., dropped: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., checksum_failures: _Optional[int] = ..., rejected_requests: _Optional[int] = ..., block_size_tokens: _Optional[int] = ..., kv_dtype: _Optional[str] = ..., uptime_s: _Optional[float] = ...) -> None: ...
