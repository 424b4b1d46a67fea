"""ilora.general"""
