"""The CIRHS synthesis pipeline (installed as ``coalign.synthesis``): prompts -> render -> filter -> assemble."""
