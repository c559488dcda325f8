"""Every setting of llama-pipe, one dataclass per ``config.yaml`` section.

These dataclasses are the single source of truth: the JSON schema in
``workflow/schemas/config.schema.yaml`` is generated from them (``llama-pipe schema``; a test
checks the file is current), the CLI flags of each stage are derived from them, and the README's
config reference and ``config.yaml``'s comments are written from the same help texts.

The sections live by the stages they serve: :mod:`.weights` (base, convert), :mod:`.chat` (the
template, system prompt and sequence length every rendering stage shares), :mod:`.data` (the data
stages, distill), :mod:`.train` (train, launch, select), :mod:`.outputs` (merge_adapter, export, eval, serve);
:mod:`.sections` assembles them into :class:`Config`, :mod:`.load` reads a file.
"""

from llama_pipe.config.chat import ChatSettings, TemplateChoice, TemplateName
from llama_pipe.config.data import CleanSettings, DataSettings, DistillSettings, FilterLangSettings, MergeSettings, SplitSettings
from llama_pipe.config.load import load_config, load_raw_config, moved_key_errors, settings_from_args, yaml_loader
from llama_pipe.config.outputs import EvalSettings, ExportSettings, MergeAdapterSettings, ServeSettings
from llama_pipe.config.sections import SECTIONS, Config, config_schema
from llama_pipe.config.train import LaunchSettings, LoraSettings, SelectSettings, TrainSettings
from llama_pipe.config.weights import BaseSettings, ConvertSettings, TinyModelSettings

__all__ = [
    "SECTIONS", "BaseSettings", "ChatSettings", "CleanSettings", "Config", "ConvertSettings", "DataSettings", "DistillSettings",
    "EvalSettings", "ExportSettings", "FilterLangSettings", "LaunchSettings", "LoraSettings", "MergeAdapterSettings",
    "MergeSettings", "SelectSettings", "ServeSettings", "SplitSettings", "TemplateChoice", "TemplateName", "TinyModelSettings",
    "TrainSettings", "config_schema", "load_config", "load_raw_config", "moved_key_errors", "settings_from_args",
    "yaml_loader",
]
