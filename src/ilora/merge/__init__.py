"""ilora.merge"""
