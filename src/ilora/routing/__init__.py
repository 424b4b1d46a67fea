"""ilora.routing"""
