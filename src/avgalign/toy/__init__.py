"""The embedded toy world: the paper's length/score study on a CPU in minutes, with a known oracle.

    world.py  the language, the task, the oracle reward and the length-biased annotator (pure)
    sft.py    the small Llama and its supervised fine-tuning on noisy demonstrations
    build.py  the world built once and cached: tokenizer, SFT policy, labelled preference pairs
    demo.py   `avgalign demo`: the sweep over (loss, aggregation, beta), table, plot and report
"""
