"""What people look at: the one-page report of a chain, its sections and page kit, feature pictures."""
