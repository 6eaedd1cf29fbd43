"""meshmq.durability"""
