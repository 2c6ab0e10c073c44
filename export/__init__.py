"""gptedge.export"""
