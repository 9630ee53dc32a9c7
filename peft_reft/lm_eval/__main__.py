"""`python -m peft_reft.lm_eval <lm_eval flags>`: see `peft_reft.lm_eval`."""

from peft_reft.lm_eval import main

main()
