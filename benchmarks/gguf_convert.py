"""Run llama.cpp's convert_hf_to_gguf.py on a GPT-2 folder whose tokenizer it does not recognise.

The converter identifies the pre-tokenizer by hashing the tokenizer's output and stops on an
unknown hash. The benchmark's synthetic tokenizer (and a gptedge-trained one) use GPT-2's
byte-level pre-tokenization, so the stock "gpt-2" answer is declared; weights are untouched.
The caller puts the converter's folder and its gguf-py on PYTHONPATH.

usage: python gguf_convert.py CONVERTER HF_DIR OUTTYPE OUTFILE
"""

import runpy
import sys

from conversion.base import TextModel  # from llama.cpp's converter folder, via PYTHONPATH


def main() -> None:
    converter, hf_dir, outtype, outfile = sys.argv[1:5]
    TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    sys.argv = [converter, hf_dir, "--outtype", outtype, "--outfile", outfile]
    runpy.run_path(converter, run_name="__main__")


if __name__ == "__main__":
    main()
