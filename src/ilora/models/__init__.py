"""ilora.models"""
