from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT64: DType

class Payload(_message.Message):
    __slots__ = ("version", "numel", "dtype", "dense", "sparse", "quantized", "natural", "sign", "low_rank")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZED_FIELD_NUMBER: _ClassVar[int]
    NATURAL_FIELD_NUMBER: _ClassVar[int]
    SIGN_FIELD_NUMBER: _ClassVar[int]
    LOW_RANK_FIELD_NUMBER: _ClassVar[int]
    version: int
    numel: int
    dtype: DType
    dense: Dense
    sparse: Sparse
    quantized: Quantized
    natural: Natural
    sign: Sign
    low_rank: LowRank
    def __init__(self, version: _Optional[int] = ..., numel: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., dense: _Optional[_Union[Dense, _Mapping]] = ..., sparse: _Optional[_Union[Sparse, _Mapping]] = ..., quantized: _Optional[_Union[Quantized, _Mapping]] = ..., natural: _Optional[_Union[Natural, _Mapping]] = ..., sign: _Optional[_Union[Sign, _Mapping]] = ..., low_rank: _Optional[_Union[LowRank, _Mapping]] = ...) -> None: ...

class Nested(_message.Message):
    __slots__ = ("dtype", "dense", "sparse", "quantized", "natural", "sign", "low_rank")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZED_FIELD_NUMBER: _ClassVar[int]
    NATURAL_FIELD_NUMBER: _ClassVar[int]
    SIGN_FIELD_NUMBER: _ClassVar[int]
    LOW_RANK_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    dense: Dense
    sparse: Sparse
    quantized: Quantized
    natural: Natural
    sign: Sign
    low_rank: LowRank
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., dense: _Optional[_Union[Dense, _Mapping]] = ..., sparse: _Optional[_Union[Sparse, _Mapping]] = ..., quantized: _Optional[_Union[Quantized, _Mapping]] = ..., natural: _Optional[_Union[Natural, _Mapping]] = ..., sign: _Optional[_Union[Sign, _Mapping]] = ..., low_rank: _Optional[_Union[LowRank, _Mapping]] = ...) -> None: ...

class FixedWidth(_message.Message):
    __slots__ = ("width", "data")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    width: int
    data: bytes
    def __init__(self, width: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class RiceCode(_message.Message):
    __slots__ = ("k", "unary", "remainders")
    K_FIELD_NUMBER: _ClassVar[int]
    UNARY_FIELD_NUMBER: _ClassVar[int]
    REMAINDERS_FIELD_NUMBER: _ClassVar[int]
    k: int
    unary: bytes
    remainders: bytes
    def __init__(self, k: _Optional[int] = ..., unary: _Optional[bytes] = ..., remainders: _Optional[bytes] = ...) -> None: ...

class IndexSet(_message.Message):
    __slots__ = ("bitmap", "gaps", "complement_gaps")
    BITMAP_FIELD_NUMBER: _ClassVar[int]
    GAPS_FIELD_NUMBER: _ClassVar[int]
    COMPLEMENT_GAPS_FIELD_NUMBER: _ClassVar[int]
    bitmap: bytes
    gaps: RiceCode
    complement_gaps: RiceCode
    def __init__(self, bitmap: _Optional[bytes] = ..., gaps: _Optional[_Union[RiceCode, _Mapping]] = ..., complement_gaps: _Optional[_Union[RiceCode, _Mapping]] = ...) -> None: ...

class IntCode(_message.Message):
    __slots__ = ("fixed", "rice", "sparse")
    FIXED_FIELD_NUMBER: _ClassVar[int]
    RICE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    fixed: FixedWidth
    rice: RiceCode
    sparse: SparseInts
    def __init__(self, fixed: _Optional[_Union[FixedWidth, _Mapping]] = ..., rice: _Optional[_Union[RiceCode, _Mapping]] = ..., sparse: _Optional[_Union[SparseInts, _Mapping]] = ...) -> None: ...

class SparseInts(_message.Message):
    __slots__ = ("count", "support", "minus_one")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_FIELD_NUMBER: _ClassVar[int]
    MINUS_ONE_FIELD_NUMBER: _ClassVar[int]
    count: int
    support: IndexSet
    minus_one: IntCode
    def __init__(self, count: _Optional[int] = ..., support: _Optional[_Union[IndexSet, _Mapping]] = ..., minus_one: _Optional[_Union[IntCode, _Mapping]] = ...) -> None: ...

class Dense(_message.Message):
    __slots__ = ("precision", "values", "scale")
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    precision: DType
    values: bytes
    scale: float
    def __init__(self, precision: _Optional[_Union[DType, str]] = ..., values: _Optional[bytes] = ..., scale: _Optional[float] = ...) -> None: ...

class Sparse(_message.Message):
    __slots__ = ("count", "seed", "indices", "values")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    count: int
    seed: int
    indices: IndexSet
    values: Nested
    def __init__(self, count: _Optional[int] = ..., seed: _Optional[int] = ..., indices: _Optional[_Union[IndexSet, _Mapping]] = ..., values: _Optional[_Union[Nested, _Mapping]] = ...) -> None: ...

class Quantized(_message.Message):
    __slots__ = ("scale", "levels", "magnitudes", "negative")
    SCALE_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    MAGNITUDES_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    scale: float
    levels: int
    magnitudes: IntCode
    negative: bytes
    def __init__(self, scale: _Optional[float] = ..., levels: _Optional[int] = ..., magnitudes: _Optional[_Union[IntCode, _Mapping]] = ..., negative: _Optional[bytes] = ...) -> None: ...

class Natural(_message.Message):
    __slots__ = ("symbol_count", "symbols", "values", "negative")
    SYMBOL_COUNT_FIELD_NUMBER: _ClassVar[int]
    SYMBOLS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    symbol_count: int
    symbols: bytes
    values: IntCode
    negative: bytes
    def __init__(self, symbol_count: _Optional[int] = ..., symbols: _Optional[bytes] = ..., values: _Optional[_Union[IntCode, _Mapping]] = ..., negative: _Optional[bytes] = ...) -> None: ...

class Sign(_message.Message):
    __slots__ = ("scale", "negative")
    SCALE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    scale: float
    negative: bytes
    def __init__(self, scale: _Optional[float] = ..., negative: _Optional[bytes] = ...) -> None: ...

class LowRankBlock(_message.Message):
    __slots__ = ("offset", "rows", "cols", "rank", "p", "q")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    P_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    offset: int
    rows: int
    cols: int
    rank: int
    p: bytes
    q: bytes
    def __init__(self, offset: _Optional[int] = ..., rows: _Optional[int] = ..., cols: _Optional[int] = ..., rank: _Optional[int] = ..., p: _Optional[bytes] = ..., q: _Optional[bytes] = ...) -> None: ...

class LowRank(_message.Message):
    __slots__ = ("blocks", "rest")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    REST_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[LowRankBlock]
    rest: Nested
    def __init__(self, blocks: _Optional[_Iterable[_Union[LowRankBlock, _Mapping]]] = ..., rest: _Optional[_Union[Nested, _Mapping]] = ...) -> None: ...
