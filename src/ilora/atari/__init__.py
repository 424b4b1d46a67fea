"""ilora.atari"""
