/* comment */ SELECT 1 -- trailing
