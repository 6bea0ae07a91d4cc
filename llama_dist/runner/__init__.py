"""One stage or a pipeline of them, behind one interface (runner.Runner)."""
from .pipeline import PipelineStage, pipeline_stage, row_groups
from .runner import Runner

__all__ = ["PipelineStage", "Runner", "pipeline_stage", "row_groups"]
