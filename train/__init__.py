"""gptedge.train"""
