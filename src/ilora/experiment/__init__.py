"""ilora.experiment"""
