"""gptedge.runtime"""
