"""Model and adapter directories as the stages after training read them: checks and loading
(``model_dir``), what a model is made of (``lineage``) and generating a reply (``generation``,
shared by distill, eval, chat and serve)."""
