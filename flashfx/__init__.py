"""flashfx"""
