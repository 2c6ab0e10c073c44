"""gptedge.quantize"""
