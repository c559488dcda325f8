"""The whole ``config.yaml``: one field per section, in the order the file lists them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llama_pipe.config.chat import ChatSettings
from llama_pipe.config.data import CleanSettings, DataSettings, DistillSettings, FilterLangSettings, MergeSettings, SplitSettings
from llama_pipe.config.outputs import EvalSettings, ExportSettings, MergeAdapterSettings, ServeSettings
from llama_pipe.config.train import LaunchSettings, SelectSettings, TrainSettings
from llama_pipe.config.weights import BaseSettings, ConvertSettings
from llama_pipe.settings import dataclass_schema, opt


@dataclass
class Config:
    """The whole ``config.yaml``."""

    base: BaseSettings = opt(BaseSettings, "base weights")
    chat: ChatSettings = opt(ChatSettings, "chat template, system prompt and sequence length, shared by every stage that renders conversations")
    convert: ConvertSettings = opt(ConvertSettings, "Meta -> Hugging Face conversion")
    data: DataSettings = opt(DataSettings, "raw inputs and sharding")
    merge: MergeSettings = opt(MergeSettings, "merge stage")
    clean: CleanSettings = opt(CleanSettings, "clean stage")
    filter_lang: FilterLangSettings = opt(FilterLangSettings, "filter-lang stage")
    split: SplitSettings = opt(SplitSettings, "split stage")
    distill: DistillSettings = opt(DistillSettings, "distill stage: training replies in the base's own words (self-distillation, replay)")
    train: TrainSettings = opt(TrainSettings, "train stage")
    launch: LaunchSettings = opt(LaunchSettings, "how the workflow starts training (one process or accelerate launch)")
    select: SelectSettings = opt(SelectSettings, "retention during training and the checkpoint the run keeps (select stage)")
    merge_adapter: MergeAdapterSettings = opt(MergeAdapterSettings, "merge-adapter stage")
    export: ExportSettings = opt(ExportSettings, "export stage (GGUF for llama.cpp)")
    eval: EvalSettings = opt(EvalSettings, "eval stage")
    serve: ServeSettings = opt(ServeSettings, "serve and chat")


#: Each section's settings class, by section name (the order of :class:`Config`).
SECTIONS: dict[str, type] = {
    "base": BaseSettings,
    "chat": ChatSettings,
    "convert": ConvertSettings,
    "data": DataSettings,
    "merge": MergeSettings,
    "clean": CleanSettings,
    "filter_lang": FilterLangSettings,
    "split": SplitSettings,
    "distill": DistillSettings,
    "train": TrainSettings,
    "launch": LaunchSettings,
    "select": SelectSettings,
    "merge_adapter": MergeAdapterSettings,
    "export": ExportSettings,
    "eval": EvalSettings,
    "serve": ServeSettings,
}


def config_schema() -> dict[str, Any]:
    """The JSON schema of config.yaml (what ``workflow/schemas/config.schema.yaml`` holds)."""
    schema = dataclass_schema(Config)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "llama-pipe config.yaml"
    return schema
