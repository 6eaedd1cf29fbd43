"""meshmq.patterns"""
