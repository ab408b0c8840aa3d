"""Glue to outside training frameworks (optional extras): :mod:`dkl.integrations.transformers`
(Hugging Face ``Trainer`` and TRL's ``SFTTrainer``; ``pip install "dkl[llm]"``)."""
