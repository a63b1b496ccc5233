"""Record MoE routing traces from transformers models through forward hooks (see docs/recorder.md)."""

from moesim.recorder.adapters import ADAPTERS, MoEAdapter, adapter_for
from moesim.recorder.parts import PartsTraceWriter, merge_parts, parts_dir_for
from moesim.recorder.presets import PRESETS, ByteTokenizer, build_preset
from moesim.recorder.record import Recorder
from moesim.recorder.session import RecordResult, load_model, load_prompts, record

__all__ = ["ADAPTERS", "PRESETS", "ByteTokenizer", "MoEAdapter", "PartsTraceWriter", "RecordResult", "Recorder",
           "adapter_for", "build_preset", "load_model", "load_prompts", "merge_parts", "parts_dir_for", "record"]
