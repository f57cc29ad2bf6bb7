"""Stage 5, serve: the aligned model behind an OpenAI-compatible endpoint on Ray Serve
(stage: deploy; app: the HTTP app; entry: `serve run`; generate*: the engines; feedback_log)."""
