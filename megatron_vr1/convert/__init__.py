"""HF <-> Megatron checkpoint conversion.

Pure layer (torch + safetensors only, no Megatron): ``arch`` (shapes from config.json), ``transforms``
(QKV / gate-up / vocab), ``names`` (the declarative name table), ``tp`` (shard / unshard full tensors),
``safetensors_io`` (streaming reader, sharded atomic writer).

Megatron layer (imports megatron-core lazily): ``exporter`` (the one streaming exporter: live TP/PP model ->
(HF name, full tensor) buckets), ``hf_to_mcore``, ``mcore_to_hf``, ``verify``.
"""

from megatron_vr1.convert.errors import ConversionError

__all__ = ["ConversionError"]
