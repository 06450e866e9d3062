"""fts-mcp: plan, run, watch and ship LoRA / QLoRA fine-tunes from an MCP client."""

__version__ = "0.1.0"
